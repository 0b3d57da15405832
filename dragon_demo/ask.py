"""One question through the device SDK, as the demo asks it."""

from __future__ import annotations

from pathlib import Path


async def ask(cloud_url: str, store_dir: Path, token: str, question: str, max_tokens: int) -> dict:
    from dragon_edge.sdk import AsyncDragonClient

    async with AsyncDragonClient(cloud_url=cloud_url, store=store_dir, auth_token=token) as client:
        reply = await client.chat.completions.create(
            messages=[{"role": "user", "content": question}], max_tokens=max_tokens, k=2, cloud_k=2)
    return {"answer": reply.choices[0].message.content, "dragon": reply.dragon}
