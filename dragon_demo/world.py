"""The demo's two sides: a small public corpus for the cloud and a few private notes for the device.

Used by ``python -m dragon_demo``, the end-to-end tests and the benchmarks. The cloud's index is
built with ``dragon_vllm.corpus`` and the device's store with ``dragon_edge.store``; both are
imported only when built, so reading the constants costs nothing.
"""

from __future__ import annotations

from pathlib import Path

PUBLIC_CORPUS = {
    "lyon.txt": "Lyon is a city in France. Lyon is the capital of the Auvergne-Rhone-Alpes region. "
                "Lyon is famous for its food, its silk history and the Festival of Lights held every December.",
    "paris.txt": "Paris is the capital of France. The Eiffel Tower in Paris was completed in 1889 "
                 "for the World's Fair.",
    "rome.txt": "Rome is the capital of Italy. The Colosseum in Rome is an ancient amphitheatre.",
    "berlin.txt": "Berlin is the capital of Germany. The Berlin Wall fell in 1989.",
}
PRIVATE_NOTES = {
    "family.md": "My sister Lena moved to Lyon last spring. She works as a nurse at a hospital there.",
    "dentist.md": "Dentist appointment with Dr. Alvarez on Thursday at 10am. Bring the insurance card.",
    "wifi.md": "The home wifi password is plum-tiger-42. The router is in the hallway closet.",
}
QUESTION = "Where does my sister Lena live, and what is that city famous for?"


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")
    return folder


def build_public_index(root: Path):
    """The cloud's side of the demo: ``PUBLIC_CORPUS`` indexed under ``root/index``."""
    from dragon_vllm.corpus import PublicIndex

    public = _write(root / "public", PUBLIC_CORPUS)
    return PublicIndex.build(sorted(public.glob("*.txt")), root / "index", progress=False, overwrite=True)


def build_private_store(root: Path):
    """The device's side of the demo: ``PRIVATE_NOTES`` ingested into ``root/store``."""
    from dragon_edge.store import DocumentStore

    store = DocumentStore(root / "store")
    store.ingest(_write(root / "notes", PRIVATE_NOTES), progress=False)
    return store


def build_demo_world(root: Path):
    """Both sides of the demo under ``root`` (used by the demo, the e2e tests and benchmarks):
    returns ``(public index, private store)``; the cloud serves ``root/index``."""
    return build_public_index(root), build_private_store(root)
