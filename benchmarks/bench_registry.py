"""The registry's read commands at 100,000 versions, each against the bare sqlite3 query of the same rows.

Every figure times a whole process (`python -m loraforge registry …` vs `python -c` with sqlite3 and json),
best of a few; peak RSS is the child's VmHWM. Registering 100,000 versions through `Registry.register`
takes minutes (one transaction, lock and pydantic copy each), so a few hundred are registered to time
that path and the rest are written in one transaction as the same rows (the manifest of a registered
template, renamed and renumbered).
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import Figure, best_of

N_VERSIONS = 100_000
N_NAMES = 500
N_REGISTERED = 200  # through Registry.register, to time it

# The child's peak resident set (VmHWM starts afresh at exec), written to the file named by PEAK_FILE.
PEAK = """
import atexit, os
def _peak():
    with open("/proc/self/status") as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    with open(os.environ["PEAK_FILE"], "w") as out:
        out.write(str(kb * 1024))
atexit.register(_peak)
"""
LORAFORGE = PEAK + "import runpy, sys; sys.argv[0] = 'loraforge'; runpy.run_module('loraforge', run_name='__main__')"

BARE_LS = PEAK + """
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
aliases = {}
for n, v, a in db.execute("SELECT name, version, alias FROM aliases ORDER BY alias"):
    aliases.setdefault((n, v), []).append(a)
cols = ("name", "version", "kind", "digest", "size", "created_at")
limit = int(sys.argv[2])
rows = [dict(zip(cols, r), aliases=aliases.get((r[0], r[1]), [])) for r in db.execute(
    "SELECT name, version, kind, digest, size, created_at FROM artifacts ORDER BY name, version LIMIT ?", [limit])]
sys.stdout.write(json.dumps(rows))
"""

BARE_SHOW = PEAK + """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
name, version = sys.argv[2].split(":")
print(db.execute("SELECT manifest FROM artifacts WHERE name = ? AND version = ?", [name, int(version)]).fetchone()[0])
"""

BARE_LINEAGE = PEAK + """
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
def manifest(ref):
    name, version = ref.split(":")
    return json.loads(db.execute("SELECT manifest FROM artifacts WHERE name = ? AND version = ?",
                                 [name, int(version)]).fetchone()[0])
node = manifest(sys.argv[2])
print(node["name"], [manifest(p["ref"])["digest"] for p in node["provenance"]["parents"]])
"""


def _template(reg):
    from loraforge.registry import AdapterInfo, FileEntry, Manifest, Provenance

    digest, size = reg.blobs.put_bytes(b"x" * 1024)
    files = [FileEntry(path="adapter.safetensors", sha256=digest, size=size)]
    return Manifest(name="a", kind="lora", digest="", files=files,
                    adapter=AdapterInfo(format="kohya", rank=8, target_modules=["to_q", "to_k"], components=["unet"]),
                    provenance=Provenance(method="import", source="bench"))


def populate(home: Path, n: int) -> float:
    """`n` versions over N_NAMES names, plus `mix:1` with two parents and aliases; seconds per register."""
    from loraforge.registry import Parent, Registry

    reg = Registry(home)
    template = _template(reg)
    t0 = time.perf_counter()
    for i in range(N_REGISTERED):
        reg.register(template.model_copy(update={"name": f"adapter-{i % N_NAMES:03d}"}))
    per_register = (time.perf_counter() - t0) / N_REGISTERED
    first = reg.resolve("adapter-000:1")
    # The rest: the rows `register` writes (artifacts + files), renamed and renumbered, in one transaction.
    next_version = {f"adapter-{i:03d}": 1 + (N_REGISTERED // N_NAMES + (i < N_REGISTERED % N_NAMES))
                    for i in range(N_NAMES)}
    rows = []
    for i in range(N_REGISTERED, n):
        name = f"adapter-{i % N_NAMES:03d}"
        version = next_version[name]
        next_version[name] += 1
        rows.append((name, version, first.model_copy(update={"name": name, "version": version}).to_json()))
    db = sqlite3.connect(home / "registry.db", isolation_level=None)
    db.execute("BEGIN")
    for name, version, text in rows:
        cur = db.execute("INSERT INTO artifacts (name, version, kind, digest, input_digest, size, created_at, manifest)"
                         " VALUES (?, ?, 'lora', ?, NULL, ?, ?, ?)",
                         [name, version, first.digest, first.total_size, first.provenance.created_at, text])
        db.execute("INSERT INTO files (artifact_id, path, sha256, size) VALUES (?, ?, ?, ?)",
                   [cur.lastrowid, first.files[0].path, first.files[0].sha256, first.files[0].size])
    db.execute("COMMIT")
    db.close()
    mix = template.model_copy(update={"name": "mix", "provenance": template.provenance.model_copy(update={
        "parents": [Parent(ref="adapter-001:1", digest=first.digest, weight=0.6),
                    Parent(ref="adapter-002:1", digest=first.digest, weight=0.4)]})})
    reg.register(mix)
    reg.tag("adapter-123:100", "prod")
    reg.tag("mix:1", "prod")
    return per_register


def run(code: str, *args: str, env: dict) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one `python -c code args` process, output discarded."""
    fd, peak_file = tempfile.mkstemp()
    os.close(fd)
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], env={**env, "PEAK_FILE": peak_file}, check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return seconds, cpu, int(Path(peak_file).read_text() or 0)
    finally:
        os.unlink(peak_file)


def best(code: str, *args: str, env: dict, repeat: int) -> tuple[float, float, int]:
    """The fastest wall and CPU times of `repeat` runs, and the largest peak RSS."""
    runs = [run(code, *args, env=env) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)


def main() -> list[Figure]:
    mb = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        per_register = populate(home, N_VERSIONS)
        populate_s = time.perf_counter() - t0
        env = {**os.environ, "LORAFORGE_HOME": str(home)}
        db = str(home / "registry.db")
        cases = [
            ("registry ls --json, 100k versions", ["registry", "ls", "--json"], BARE_LS, [db, "-1"], "<= 1 s", 1.0),
            ("registry ls --limit 50", ["registry", "ls", "--limit", "50"], BARE_LS, [db, "50"], "", None),
            ("registry show NAME:VER", ["registry", "show", "adapter-123:100"], BARE_SHOW, [db, "adapter-123:100"],
             "<= 0.15 s", 0.15),
            ("registry lineage NAME:VER", ["registry", "lineage", "mix:1"], BARE_LINEAGE, [db, "mix:1"],
             "<= 0.15 s", 0.15),
        ]
        figures = []
        for title, args, bare, bare_args, goal, limit in cases:
            repeat = 3 if "100k" in title else 5
            ours, ours_cpu, ours_peak = best(LORAFORGE, *args, env=env, repeat=repeat)
            base, base_cpu, base_peak = best(bare, *bare_args, env=env, repeat=repeat)
            figures.append(Figure(f"{title} (process)", ours, "bare sqlite3 + json (process)", base, goal,
                                  None if limit is None else ours <= limit,
                                  f"CPU {ours_cpu:.2f} s vs {base_cpu:.2f} s; "
                                  f"peak RSS {ours_peak / mb:.0f} MB vs {base_peak / mb:.0f} MB"))
        start_s = best_of(lambda: subprocess.run([sys.executable, "-m", "loraforge", "--help"], env=env, check=True,
                                                 capture_output=True), 3)
        bare_start_s = best_of(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 3)
        figures.append(Figure("loraforge --help (process)", start_s, "python -c pass", bare_start_s))
    print(f"\nregistry with {N_VERSIONS:,} versions ({N_NAMES} names); populated in {populate_s:.1f} s; "
          f"Registry.register takes {per_register * 1000:.1f} ms a version "
          f"({per_register * N_VERSIONS:.0f} s for all {N_VERSIONS:,}, so the rest were written in one transaction)")
    print(f"{'operation':<40}{'seconds':>9}{'baseline s':>12}{'ratio':>8}  note")
    for f in figures:
        print(f"{f.name:<40}{f.seconds:>9.3f}{f.baseline_seconds:>12.3f}{f.ratio:>8.2f}  {f.note}")
    return figures


if __name__ == "__main__":
    main()
