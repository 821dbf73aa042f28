"""Talk to `mmedge serve` with the official `openai` client: a streamed chat about an image, and
embeddings that compare the image with the question.

    mmedge serve clip-tiny blip2-tiny        # in another shell: http://127.0.0.1:8000
    python examples/openai_client.py IMAGE "what colour is the circle?" \\
        --chat-model blip2-tiny --embed-model clip-tiny [--base-url http://127.0.0.1:8000/v1]

The image travels as a data URL. Set MMEDGE_SERVE_TOKEN when the server requires a token.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
from pathlib import Path

import numpy as np
from openai import OpenAI


def main(argv: list[str] | None = None) -> tuple[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("question")
    ap.add_argument("--chat-model", required=True, help="a chat package the server serves")
    ap.add_argument("--embed-model", required=True, help="a retrieval package the server serves")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    client = OpenAI(
        base_url=args.base_url, api_key=os.environ.get("MMEDGE_SERVE_TOKEN", "unused-on-loopback")
    )
    kind = mimetypes.guess_type(args.image)[0] or "image/png"
    url = f"data:{kind};base64," + base64.b64encode(Path(args.image).read_bytes()).decode()

    stream = client.chat.completions.create(
        model=args.chat_model,
        max_tokens=args.max_tokens,
        temperature=0,  # greedy: the same answer every time
        stream=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": args.question},
                ],
            }
        ],
    )
    pieces = []
    print("answer: ", end="", flush=True)
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            print(piece, end="", flush=True)
            pieces.append(piece)
    print()

    # Images are mmedge's extension of the embeddings input: {"image": URL} beside plain texts.
    reply = client.embeddings.create(model=args.embed_model, input=[{"image": url}, args.question])  # type: ignore[list-item]
    image_vec, text_vec = (np.array(d.embedding, np.float32) for d in reply.data)
    similarity = float(image_vec @ text_vec)  # the vectors are L2-normalised: a dot is the cosine
    print(f"image-question similarity: {similarity:.6f} ({len(image_vec)}-d vectors)")
    return "".join(pieces), similarity


if __name__ == "__main__":
    main()
