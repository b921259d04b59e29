"""Converting where the checkpoint lives, measured beside "download then convert".

One checkpoint (a directory given with --model, or a synthetic bf16 one written here) is served
by tests/remote_server.py throttled to RATE MB/s over all connections, and converted twice:
  remote    `bitnet-gguf convert http://.../` (byte ranges, nothing of the weights stored);
  download  huggingface_hub's snapshot_download from the same server (HF_ENDPOINT), then a local
            conversion of the downloaded directory.
Each prints wall time, CPU time of the process tree, the mean load average (the machine may be
shared), peak RSS of the process tree and peak disk (remote: run directory + output, its temporary
name included, + staged small files; download: the downloaded checkpoint + run directory +
output), the bytes fetched and
their bare transfer time at RATE, and whether both GGUF files are the same bytes.

    python -m tests.bench_remote --model build/bench/llama3-8b-packed [--rate 100] [--workdir DIR] [--low-disk]
    python -m tests.bench_remote --synthetic-bf16 HIDDEN,INTERMEDIATE,LAYERS,VOCAB [--rate 100]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peak_rss import disk_bytes, run_measuring_peak  # noqa: E402
from tests.remote_server import CheckpointServer  # noqa: E402

MB, MiB, GiB = 1000**2, 1024**2, 1024**3
REPO = "bench/model"


def measured(cmd: list[str], env: dict, disk: list[Path]) -> dict:
    r = run_measuring_peak(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, interval=0.1, disk=disk)
    if r["exit"]:
        raise SystemExit(f"{' '.join(map(str, cmd[:5]))} ... failed:\n{r['stderr']}")
    return r


def convert_cmd(source, out: Path, limit: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "convert", str(source), "-o", str(out), "--no-progress",
            "--memory-limit", limit, *extra]


class Timeline:
    """Every `interval` s while a conversion runs: the bytes the server has sent, the stage the run
    directory's manifest says is running and the CPU of this process's children (the conversion),
    whole and per thread; `summary()` gives per stage its seconds, bytes fetched, mean rate and CPU
    (the main thread's, and the busiest other threads'), and the seconds the link idled between the
    first weight byte and the last."""

    def __init__(self, server, run_dir: Path, interval: float = 0.5):
        self.server, self.manifest, self.interval = server, run_dir / "manifest.json", interval
        self.samples: list[tuple[float, int, str, float]] = []
        self.threads: list[dict[tuple[int, int], float]] = []  # per sample: (pid, thread id) -> CPU s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _stage(self, previous: str) -> str:
        """The stage running, else the one before (between two stages: the end of the last)."""
        try:
            stages = json.loads(self.manifest.read_text())["stages"]
        except (OSError, ValueError, KeyError):
            return previous
        running = [s for s in ("extract", "quantize", "pack", "assemble")
                   if stages.get(s, {}).get("state") == "running"]
        return running[0] if running else ("end" if stages.get("assemble", {}).get("state") == "done" else previous)

    @staticmethod
    def _cpu() -> tuple[float, dict[tuple[int, int], float]]:
        total, threads = 0.0, {}
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
                threads.update({(p.pid, th.id): th.user_time + th.system_time for th in p.threads()})
            except psutil.Error:
                pass
        return total, threads

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            cpu, threads = self._cpu()
            cpu = max(self.samples[-1][3] if self.samples else 0.0, cpu)  # the child's, once it ends
            self.threads.append({**(self.threads[-1] if self.threads else {}), **threads})
            stage = self._stage(self.samples[-1][2] if self.samples else "start")
            self.samples.append((time.monotonic() - t0, self.server.sent(""), stage, cpu))
            self.stop.wait(self.interval)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self, rate: float) -> str:
        s = self.samples
        moving = [i for i in range(1, len(s)) if s[i][1] - s[i - 1][1] > 0]
        first, last = (moving[0], moving[-1]) if moving else (len(s), -1)
        idle: dict[str, float] = {}  # per stage: seconds under a tenth of the rate, first to last byte
        for i in range(max(first, 1), last + 1):
            dt = s[i][0] - s[i - 1][0]
            if s[i][1] - s[i - 1][1] < 0.1 * rate * dt:
                idle[s[i][2]] = idle.get(s[i][2], 0.0) + dt
        rows = []
        for stage in ("start", "extract", "quantize", "pack", "assemble", "end"):
            idx = [i for i, x in enumerate(s) if x[2] == stage]
            if not idx:
                continue
            a, b = idx[0], min(idx[-1] + 1, len(s) - 1)
            secs, got, cpu = s[b][0] - s[a][0], s[b][1] - s[a][1], s[b][3] - s[a][3]
            rows.append(f"{stage} {secs:.1f} s: {got / GiB:.2f} GiB at {got / max(secs, 1e-9) / MB:.0f} MB/s, "
                        f"CPU {cpu:.1f} s ({self._per_thread(a, b)}), link idle {idle.get(stage, 0.0):.1f} s")
        return "; ".join(rows) + f"; link idle {sum(idle.values()):.1f} s between the first and the last byte"


    def _per_thread(self, a: int, b: int) -> str:
        """CPU between samples a and b: the main thread's (the writer in assemble), then the others',
        busiest first."""
        before, after = self.threads[a], self.threads[b]
        used = {k: v - before.get(k, 0.0) for k, v in after.items()}
        main = sum(v for (pid, tid), v in used.items() if pid == tid)
        others = sorted((v for (pid, tid), v in used.items() if pid != tid and v >= 0.05), reverse=True)
        return (f"main thread {main:.1f} s, {len(others)} others {sum(others):.1f} s: "
                + " ".join(f"{v:.1f}" for v in others[:6]))


def stage_times(stderr: str) -> str:
    return ", ".join(line.split(": done in ")[0].split()[-1] + " " + line.split(": done in ")[1]
                     for line in stderr.splitlines() if ": done in " in line)


def line(name: str, r: dict, extra: str = "") -> str:
    return (f"{name}: {r['seconds']:.1f} s wall, {r['cpu']:.1f} s CPU, load {r['load'] or 0:.1f}; peak RSS "
            f"{r['peak'] / MiB:.0f} MiB; peak disk {r['disk_peak'] / GiB:.2f} GiB{extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a checkpoint directory to serve")
    src.add_argument("--synthetic-bf16", metavar="H,I,L,V",
                     help="write a 1bitllm-family bf16 checkpoint of hidden, intermediate, layers, vocab")
    ap.add_argument("--rate", type=float, default=100.0, help="MB/s (10^6 bytes) of the throttled server")
    ap.add_argument("--limit", default="1GiB", help="--memory-limit of every conversion")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-remote"))
    ap.add_argument("--skip-download", action="store_true", help="measure the remote conversion only")
    ap.add_argument("--low-disk", action="store_true", help="convert with --low-disk (both conversions)")
    args = ap.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    model = args.model
    if model is None:
        from tests.synthetic import write_checkpoint

        h, i, n, v = (int(x) for x in args.synthetic_bf16.split(","))
        model = write_checkpoint(args.workdir / "model", "1bitllm", hidden_size=h, intermediate_size=i,
                                 num_layers=n, num_heads=h // 128, vocab_size=v, dtype="bf16")
    size = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    rate = args.rate * MB
    model = model.resolve()  # the server serves files inside its root only
    server = CheckpointServer(model, repo=REPO)
    server.throttle = int(rate)
    tmp = args.workdir / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "HF_ENDPOINT": server.url, "HF_HOME": str(args.workdir / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    print(f"checkpoint {model}: {size / GiB:.2f} GiB; server at {args.rate:g} MB/s; --memory-limit {args.limit}",
          flush=True)
    try:
        extra = ("--low-disk",) if args.low_disk else ()
        out = args.workdir / "remote" / "remote.gguf"  # a directory of its own: output, temporary, run dir
        out.parent.mkdir()
        run_dir = Path(str(out) + ".work")
        timeline = Timeline(server, run_dir)
        try:
            r = measured(convert_cmd(server.dir_url, out, args.limit, *extra), env, [out.parent, tmp])
        finally:
            timeline.close()
        fetched = server.sent("")
        bare = fetched / rate
        output = out.stat().st_size
        print(line("remote", r, f" ({r['disk_peak'] / output:.2f}x the output, {output / GiB:.2f} GiB)")
              + f"\n  fetched {fetched / GiB:.2f} GiB ({fetched / size:.2f}x the checkpoint), bare transfer "
              f"{bare:.1f} s: ratio {r['seconds'] / bare:.2f}\n  stages: {stage_times(r['stderr'])}"
              f"\n  timeline: {timeline.summary(rate)}", flush=True)
        shutil.rmtree(run_dir)
        if args.skip_download:
            return 0
        server.log.clear()
        local = args.workdir / "download" / model.name  # general.name comes from the directory name
        get = [sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
               "snapshot_download(sys.argv[1], local_dir=sys.argv[2])", REPO, str(local)]
        d = measured(get, env, [local, args.workdir / "hf-home"])
        print(line("  download (snapshot_download)", d) + f"; fetched {server.sent('') / GiB:.2f} GiB", flush=True)
        out2 = args.workdir / "local" / "local.gguf"
        out2.parent.mkdir()
        c = measured(convert_cmd(local, out2, args.limit, *extra), {}, [local, out2.parent])
        print(line("  then convert", c) + f"\n  stages: {stage_times(c['stderr'])}", flush=True)
        total = {"seconds": d["seconds"] + c["seconds"], "cpu": d["cpu"] + c["cpu"],
                 "load": ((d["load"] or 0) + (c["load"] or 0)) / 2, "peak": max(d["peak"], c["peak"]),
                 "disk_peak": max(d["disk_peak"], c["disk_peak"])}
        print(line("download then convert", total, f" ({total['disk_peak'] / output:.2f}x the output)"))
        same = filecmp.cmp(out, out2, shallow=False)
        print(f"same bytes: {same}; disk now under {args.workdir}: {disk_bytes([args.workdir]) / GiB:.2f} GiB")
        return 0 if same else 1
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
