"""Registry listing with 10,000 versions in the catalog: `registry ls` vs parsing every manifest."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import best_of

N_VERSIONS = 10_000


def _populate(home: Path, n: int) -> None:
    from loraforge.registry import AdapterInfo, FileEntry, Manifest, Provenance, Registry

    reg = Registry(home)
    digest, size = reg.blobs.put_bytes(b"x" * 1024)
    files = [FileEntry(path="adapter.safetensors", sha256=digest, size=size)]
    template = Manifest(name="a", kind="lora", digest="", files=files,
                        adapter=AdapterInfo(format="kohya", rank=8, target_modules=["to_q", "to_k"],
                                            components=["unet"]),
                        provenance=Provenance(method="import", source="bench"))
    # One transaction per 1,000 rows; names spread so listing sorts over many names.
    for i in range(n):
        reg.register(template.model_copy(update={"name": f"adapter-{i % 500:03d}"}))



def main() -> None:
    from loraforge.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        _populate(home, N_VERSIONS)
        populate_s = time.perf_counter() - t0
        reg = Registry(home)
        list_s = best_of(lambda: reg.list())
        parse_s = best_of(lambda: list(reg.iter_manifests()))
        env = {**os.environ, "LORAFORGE_HOME": str(home)}
        cli = [sys.executable, "-m", "loraforge", "registry", "ls"]
        cli_json_s = best_of(lambda: subprocess.run(cli + ["--json"], env=env, check=True, capture_output=True), 2)
        cli_table_s = best_of(lambda: subprocess.run(cli, env=env, check=True, capture_output=True), 2)
        start_s = best_of(lambda: subprocess.run([sys.executable, "-m", "loraforge", "--help"], env=env,
                                               check=True, capture_output=True), 2)
    print(f"\nregistry with {N_VERSIONS:,} versions (500 names); registering them took {populate_s:.1f}s")
    print(f"{'operation':<44}{'seconds':>10}{'ratio':>10}")
    print(f"{'Registry.list() (catalog columns only)':<44}{list_s:>10.3f}{1.0:>10.2f}")
    print(f"{'baseline: parse every manifest (pydantic)':<44}{parse_s:>10.3f}{parse_s / list_s:>10.2f}")
    print(f"{'loraforge registry ls --json (process)':<44}{cli_json_s:>10.3f}")
    print(f"{'loraforge registry ls (plain table)':<44}{cli_table_s:>10.3f}")
    print(f"{'loraforge --help (interpreter + CLI start)':<44}{start_s:>10.3f}")


if __name__ == "__main__":
    main()
