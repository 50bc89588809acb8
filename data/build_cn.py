"""Rebuild the frozen CN benchmark (data/poems-cn-256.jsonl, data/poems-cn-512.jsonl) bit-identically.

    npm pack chinese-poetry@2.0.1          # -> chinese-poetry-2.0.1.tgz (keep it outside the repository)
    python data/build_cn.py --tarball chinese-poetry-2.0.1.tgz
    python data/build_cn.py --tarball chinese-poetry-2.0.1.tgz --nested 16384    # the capacity sample

Tang and Song shi (dist/quantangshi/poet.{tang,song}.N.json) and Song ci (dist/songci/ci.song.N.json)
are converted to Simplified Chinese (OpenCC t2s); a ci's title is its tune and first phrase
("浣溪沙·一曲新词酒一杯"). Records that are empty or hold □ (an unreadable character) are dropped,
then every prompt (dynasty, author, title) that names more than one record; engine.data.select then
keeps the length bin and samples 2,000 poems with a fixed seed, in corpus order.

--nested N writes instead data/poems-cn-256-nested.jsonl.gz (engine/capacity.py's poems): the
256-bin pool under the same rules, shuffled once with --seed, its first N poems. The first n lines
are the capacity sweep's sample of n poems, so each larger sample holds every smaller one.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.data import Poem, select, unique_prompts  # noqa: E402

SHA1 = "b6e7e60d0accac7c723d066a5c360549aab8299d"
SOURCES = [   # (member pattern, dynasty, title field), read in this order, files by number
    (r"package/dist/quantangshi/poet\.tang\.(\d+)\.json", "唐代", "title"),
    (r"package/dist/quantangshi/poet\.song\.(\d+)\.json", "宋代", "title"),
    (r"package/dist/songci/ci\.song\.(\d+)\.json", "宋代", "rhythmic"),
]


def ci_title(rhythmic: str, paragraphs: list[str]) -> str:
    first_phrase = re.split(r"[，。、；：？！,.;:?!\s]", paragraphs[0].strip(), maxsplit=1)[0] if paragraphs else ""
    return f"{rhythmic}·{first_phrase}"


def read_corpus(tarball: Path, stats: Counter) -> list[Poem]:
    import opencc
    convert = opencc.OpenCC("t2s").convert

    def t2s(text: str) -> str:   # repeat: one pass can leave a variant that a second pass simplifies (隠 -> 隱 -> 隐)
        while (simpler := convert(text)) != text:
            text = simpler
        return text

    poems = []
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        for pattern, dynasty, title_field in SOURCES:
            members = sorted((int(m.group(1)), name) for name in names if (m := re.fullmatch(pattern, name)))
            if not members:
                raise SystemExit(f"{tarball} has no file matching {pattern}: is it chinese-poetry@2.0.1?")
            for _, name in members:
                for record in json.load(tar.extractfile(name)):
                    stats["records"] += 1
                    paragraphs = [p for p in record.get("paragraphs") or [] if p.strip()]
                    title = record.get("title") if title_field == "title" else ci_title(record.get("rhythmic", ""), paragraphs)
                    poem = Poem(dynasty, t2s((record.get("author") or "").strip()), t2s((title or "").strip()),
                                t2s("\n".join(p.strip() for p in paragraphs)))
                    if not (poem.author and poem.title and poem.content) or poem.title == "·":
                        stats["dropped: empty"] += 1
                    elif "□" in poem.author + poem.title + poem.content:
                        stats["dropped: holds □"] += 1
                    else:
                        poems.append(poem)
    return poems


def jsonl_text(poems: list[Poem]) -> str:
    return "".join(json.dumps({"dynasty": p.dynasty, "author": p.author, "title": p.title, "content": p.content},
                              ensure_ascii=False, sort_keys=True) + "\n" for p in poems)


def write_jsonl(poems: list[Poem], path: Path) -> None:
    path.write_bytes(jsonl_text(poems).encode("utf-8"))


def nested_order(pool: list[Poem], seed: int) -> list[Poem]:
    """The pool in one seeded random order: its first n poems are the sample of n, for every n."""
    order = list(pool)
    random.Random(seed).shuffle(order)
    return order


def write_nested(poems: list[Poem], path: Path) -> None:
    """gzip without a timestamp or file name in its header, so that the same poems give the same bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(jsonl_text(poems).encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", type=Path, required=True, help="chinese-poetry-2.0.1.tgz from `npm pack`")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nested", type=int, help="write the capacity sample of this many 256-bin poems instead")
    args = parser.parse_args()
    sha1 = hashlib.sha1(Path(args.tarball).read_bytes()).hexdigest()      # file_digest needs Python 3.11
    if sha1 != SHA1:
        raise SystemExit(f"{args.tarball}: sha1 {sha1} is not {SHA1} (chinese-poetry@2.0.1); "
                         "fetch it again with `npm pack chinese-poetry@2.0.1`")
    stats = Counter()
    poems = read_corpus(args.tarball, stats)
    unique = unique_prompts(poems, "cn")
    stats["dropped: ambiguous (dynasty, author, title)"] = len(poems) - len(unique)
    stats["kept"] = len(unique)
    for key, value in stats.items():
        print(f"{key:>46}: {value}")
    if args.nested:
        pool = select(unique, "cn", 256, None, args.seed)
        if len(pool) < args.nested:
            raise SystemExit(f"--nested {args.nested}: the 256 bin holds only {len(pool)} poems")
        path = args.out / "poems-cn-256-nested.jsonl.gz"
        write_nested(nested_order(pool, args.seed)[:args.nested], path)
        print(f"{path.name}: the first {args.nested} of {len(pool)} poems in the 256 bin, shuffled with seed "
              f"{args.seed}; sha1 {hashlib.sha1(path.read_bytes()).hexdigest()}, {path.stat().st_size:,} bytes")
        return
    for length in (256, 512):
        chosen = select(unique, "cn", length, args.n, args.seed, where="the corpus")
        write_jsonl(chosen, args.out / f"poems-cn-{length}.jsonl")
        pool = len(select(unique, "cn", length, None, args.seed))
        print(f"poems-cn-{length}.jsonl: {len(chosen)} of {pool} poems in the length bin")


if __name__ == "__main__":
    main()
