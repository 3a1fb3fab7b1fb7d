"""The bundled model's training photos: two Debian packages, fetched offline-reproducibly.

``fetch_photos`` runs ``apt-get download`` + ``dpkg-deb -x`` (no root, nothing installed), copies
the photos into one folder and writes ``manifest.json``: every file's package, version, licence,
copyright holder, sha256 and split (train or holdout). Licences come from the packages' own
machine-readable ``debian/copyright`` files, so the manifest cannot drift from what Debian ships.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class PhotoSource:
    package: str
    folder: str  # where the package installs the photos
    pattern: str  # which files there are photos
    copyright_prefix: str  # how debian/copyright names that folder


SOURCES = (
    PhotoSource("lomiri-wallpapers-16.04", "usr/share/backgrounds", "*.jpg", "16.04/"),
    PhotoSource("mate-backgrounds", "usr/share/backgrounds/mate/nature", "*.jpg", "nature/"),
)
#: Never trained on: the bundled model's evaluation photos (two per package, varied content).
HOLDOUT = frozenset({"seeding_by_Clements_Engelhardt.jpg", "Wine_by_Jakkub_Mede.jpg", "Storm.jpg", "LadyBird.jpg"})


@dataclass(frozen=True)
class Photo:
    file: str
    package: str
    version: str
    license: str
    copyright: str
    sha256: str
    split: str


def parse_copyright(text: str) -> list[dict[str, str]]:
    """DEP-5 stanzas as dicts; continuation lines are joined with newlines."""
    stanzas: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def licence_for(stanzas: list[dict[str, str]], path: str) -> tuple[str, str]:
    """(licence, copyright) of ``path`` (relative, as debian/copyright names it); last match wins."""
    found = ("", "")
    for stanza in stanzas:
        patterns = stanza.get("Files", "").split()
        if any(fnmatch.fnmatch(path, p) for p in patterns) and "License" in stanza:
            holders = " ".join(stanza.get("Copyright", "").split())
            found = (stanza["License"].splitlines()[0].strip(), holders)
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise ConfigError(f"{cmd[0]} not found: fetching the photos needs a Debian/Ubuntu system") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout).strip().splitlines()
        raise ConfigError(f"{' '.join(cmd)} failed: {detail[-1] if detail else exc.returncode}") from None
    return done.stdout


def collect(source: PhotoSource, root: Path, version: str, dest: Path) -> list[Photo]:
    """Copy one extracted package's photos into ``dest`` and describe them."""
    stanzas = parse_copyright((root / "usr/share/doc" / source.package / "copyright").read_text())
    photos = []
    for path in sorted((root / source.folder).glob(source.pattern)):
        licence, holder = licence_for(stanzas, source.copyright_prefix + path.name)
        if not licence:
            raise ConfigError(f"{source.package}: no licence for {path.name} in debian/copyright")
        shutil.copy2(path, dest / path.name)
        split = "holdout" if path.name in HOLDOUT else "train"
        photos.append(Photo(path.name, source.package, version, licence, holder, _sha256(path), split))
    return photos


def fetch_photos(dest: Path) -> list[Photo]:
    """Download both packages, extract their photos into ``dest`` and write the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    photos: list[Photo] = []
    with tempfile.TemporaryDirectory(prefix="ctsr-photos-") as tmp:
        work = Path(tmp)
        for source in SOURCES:
            # a dropped download is tried again, up to five times
            _run(["apt-get", "-o", "Acquire::Retries=5", "download", source.package], work)
            deb = next(work.glob(f"{source.package}_*.deb"))
            version = deb.name.split("_")[1]
            root = work / source.package
            _run(["dpkg-deb", "-x", str(deb), str(root)], work)
            photos += collect(source, root, version, dest)
    write_manifest(dest, photos)
    return photos


def write_manifest(dest: Path, photos: list[Photo]) -> None:
    data = {"sources": [asdict(s) for s in SOURCES], "photos": [asdict(p) for p in photos]}
    (dest / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")


def read_manifest(folder: Path, split: str | None = None) -> list[Path]:
    """Photo paths listed in ``folder``'s manifest (optionally one split), checked to exist."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{folder}: no {MANIFEST_NAME} (run `ctsr data fetch {folder}`)")
    entries = json.loads(path.read_text())["photos"]
    files = [folder / e["file"] for e in entries if split is None or e["split"] == split]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{folder}: {len(missing)} photo(s) in the manifest are missing, e.g. {missing[0]}")
    return files


def photo_files(inputs: list[Path], split: str) -> list[Path]:
    """Files, or folders: a fetched folder gives its manifest's split (or ``all``), others every image."""
    from ..imaging import list_images

    files: list[Path] = []
    for path in inputs:
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            files += read_manifest(path, None if split == "all" else split)
        else:
            files += list_images([path])
    return files
