"""Which sites a ``prepare`` run reads: the ``--posts`` inputs -> one ``SiteSource`` per site.

    python -c "from stackllama_ds.data.sources import resolve_sources; print(*resolve_sources(['data']), sep='\\n')"

Each input is one of
- a ``Posts.xml`` file (any name): one site, named by its folder. Its up-votes come only from an
  explicit ``votes`` file (one input only); a Votes.xml beside it is not picked up, as before;
- a paired file (``.jsonl``/``.json``/``.parquet``, see paired_reader.py): then it must be the only input;
- a folder: the site it holds when it has a ``Posts.xml`` (named by the folder); otherwise every
  ``<site>/Posts.xml`` and every ``<site>.7z`` in it, sorted by site;
- a ``<site>.7z`` dump archive with ``Posts.xml`` (and ``Votes.xml``) at its top level, read as a
  stream. Stack Overflow's ``<site>-Posts.7z`` is site ``<site>``, with ``<site>-Votes.7z`` beside it.
A site found through a folder or an archive uses its ``Votes.xml`` when there is one. ``site``
renames the site when the inputs hold exactly one. A site named twice is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stackllama_ds.data.paired_reader import is_paired
from stackllama_ds.data.posts import DataError, DumpFile, site_of

POSTS, VOTES = "Posts.xml", "Votes.xml"
_SO_TABLES = ("Badges", "Comments", "PostHistory", "PostLinks", "Tags", "Users", "Votes")


@dataclass(frozen=True)
class SiteSource:
    site: str
    posts: DumpFile  # Posts.xml, or a paired file
    votes: DumpFile | None = None
    paired: bool = False

    def __str__(self) -> str:
        votes = f" + {self.votes}" if self.votes is not None else ""
        return f"{self.site}: {self.posts}{votes}"


def _from_archive(archive: Path) -> SiteSource:
    from stackllama_ds.data.archive import member_sizes

    stem = archive.name[: -len(".7z")]
    members = member_sizes(archive)
    if POSTS not in members:
        raise DataError(f"no {POSTS} at the top level of the archive (it holds {', '.join(sorted(members))})",
                        archive)
    site, votes = stem, None
    if VOTES in members:
        votes = DumpFile(archive, VOTES)
    if stem.endswith("-Posts"):  # stackoverflow.com-Posts.7z: one archive per table
        site = stem[: -len("-Posts")]
        sibling = archive.with_name(f"{site}-Votes.7z")
        if votes is None and sibling.is_file() and VOTES in member_sizes(sibling):
            votes = DumpFile(sibling, VOTES)
    return SiteSource(site, DumpFile(archive, POSTS), votes)


def _from_folder(folder: Path) -> SiteSource:
    votes = folder / VOTES
    return SiteSource(folder.resolve().name, DumpFile(folder / POSTS), DumpFile(votes) if votes.is_file() else None)


def _scan(folder: Path) -> list[SiteSource]:
    """The sites of a folder: itself when it holds Posts.xml, else its ``<site>/`` and ``<site>.7z``."""
    if (folder / POSTS).is_file():
        return [_from_folder(folder)]
    found: list[SiteSource] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and (child / POSTS).is_file():
            found.append(_from_folder(child))
        elif child.is_file() and child.name.endswith(".7z"):
            if any(child.name.endswith(f"-{t}.7z") for t in _SO_TABLES):
                continue  # another table of a <site>-Posts.7z dump
            found.append(_from_archive(child))
    if not found:
        raise DataError(f"no {POSTS}, <site>/{POSTS} or <site>.7z in this folder", folder)
    return sorted(found, key=lambda s: s.site)


def resolve_sources(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                    votes: str | os.PathLike[str] | None = None, site: str | None = None) -> list[SiteSource]:
    """One SiteSource per site, in input order (a folder's sites sorted by name)."""
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input: give at least one Posts.xml, folder or .7z archive")
    sources: list[SiteSource] = []
    for p in paths:
        if p.is_dir():
            sources += _scan(p)
        elif not p.exists():
            raise DataError("file not found", p)
        elif p.name.endswith(".7z"):
            sources.append(_from_archive(p))
        else:
            sources.append(SiteSource(site_of(p), DumpFile(p), paired=is_paired(p)))
    if len(sources) > 1 and any(s.paired for s in sources):
        bad = next(s for s in sources if s.paired)
        raise DataError("a paired file must be the only input (it has no site of its own)", bad.posts)
    seen: dict[str, SiteSource] = {}
    for s in sources:
        if s.site in seen:
            raise DataError(f"site {s.site} is given twice: {seen[s.site].posts} and {s.posts}")
        seen[s.site] = s
    if votes is not None:
        if len(sources) > 1 or sources[0].posts.member is not None:
            raise DataError("votes goes with a single Posts.xml file; with folders and archives each site's "
                            "Votes.xml sits beside its Posts.xml (or in its .7z)", votes)
        sources[0] = SiteSource(sources[0].site, sources[0].posts, DumpFile(Path(votes)), sources[0].paired)
    if site is not None:
        if len(sources) > 1:
            raise DataError(f"site {site!r} names one site, but the inputs hold {len(sources)}: "
                            + ", ".join(s.site for s in sources))
        sources[0] = SiteSource(site, sources[0].posts, sources[0].votes, sources[0].paired)
    return sources
