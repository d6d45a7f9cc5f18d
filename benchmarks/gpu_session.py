"""One GPU session's checks and benchmarks in one command that ends inside its device time.

A session is lent a GPU machine for 15 minutes in all, a minute or more of it for the start, and
that machine fetches nothing. This script is the one command to run there. It needs only the
standard library itself: every step is a child process, so a step that fails (an import, out of
memory, a time limit) is recorded and the next one still runs.

    bash benchmarks/gpu_wheels.sh          # here, once: the wheels the machine lacks, into .whl/
    python3 benchmarks/gpu_session.py      # there, with .whl carried: results under $OUT

Steps, in order of what the performance issue needs first; each has a cap in seconds, and none
runs past ``--budget`` (540 s by default, which leaves a 600 s call a minute for the wheels and
the copy back):

1. ``wheels``: installs the carried wheels into a folder of their own (``--target``), first on
   the children's ``PYTHONPATH``; the machine's own packages are left as they are.
2. ``environment``: the versions that ran (Python, torch, CUDA, transformers, bitsandbytes), the
   GPU, and that ``minigpt4`` imports. Without it nothing else can run, so a failure ends the session.
3. ``gpu_tests``: the ``gpu``-marked tests (fp16 ViT, 8-bit and 4-bit loading, the CUDA-graph
   decode loop against ``generate``, alone and as ``Chat(decode="static")``), as JUnit XML.
4. ``static_decode``: ``bench_chat.py --quant none --modes reference default --compile --decode static``,
   fp16 as a whole: the decode loop's tokens/s as a fraction of the copy-bandwidth limit, next to
   ``generate``'s (eager and transformers' compiled static cache), its turn-2 TTFT against the
   reference's, its greedy tokens against ``generate``'s at 7B fp16 over 200 tokens; TTFT of 20
   turns and memory including the load in every mode; captioning 16 images against the
   reference's one image at a time, and the loop's batch of 16 against ``answer_batch``; a profile
   of one answer by the loop and by ``generate`` (kernel time per token, the GPU's busy share),
   and of one turn 2 in each mode.
5. ``train_stage1``, ``train_stage2``: ``bench_train.py`` with the reference and the mode a user
   of that stage runs: ``default+packed+compile`` for stage 1 (its random crops rule out the
   feature cache), ``default+cache+packed+compile`` for stage 2.
6. ``chat_quant``: ``bench_chat.py --quant 8bit 4bit --caption-images 0``: the 8-bit and 4-bit
   peaks including the load.

What comes back (at most 8 files, as the device tool returns): ``session.json`` (each step's
command, exit status, seconds, whether it timed out, and the headline figures read from the
records), ``session.log`` (everything the steps printed), ``gpu_tests.xml`` and each benchmark's
record under a folder named after its step. ``--tiny`` runs the same steps at tiny shapes on the
CPU in seconds (the gpu tests skip there): what the test suite runs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/models/test_gpu.py", "tests/conversation/test_decode.py", "tests/conversation/test_engine_static.py"]
ENVIRONMENT = """
import importlib.metadata as m, json, platform, torch
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
import minigpt4
cuda = torch.cuda.is_available()
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "transformers": version("transformers"), "huggingface_hub": version("huggingface_hub"),
    "bitsandbytes": version("bitsandbytes"), "minigpt4_from": minigpt4.__file__,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
}))
"""


def steps(tiny: bool, out: Path, py: str) -> list[dict[str, Any]]:
    """The session's steps: name, command, cap (s), and the record it writes (if any)."""
    chat, train = [py, "benchmarks/bench_chat.py"], [py, "benchmarks/bench_train.py"]
    small_chat = ["--tiny", "--decode-tokens", "6", "--repeats", "2", "--caption-tokens", "2", "--caption-repeats", "1"] if tiny else []
    record = "chat_tiny.json" if tiny else "chat.json"
    small_train, train_record = (["--tiny", "--steps", "2", "--warmup", "1"], "train_tiny.json") if tiny else ([], "train.json")
    listed = [
        dict(name="gpu_tests", cap=120, command=[py, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS,
                                                 f"--junitxml={out / 'gpu_tests.xml'}"]),
        # fp16 as a whole: the reference, default and compile modes, the static loop, and captioning
        # (the reference's one image at a time, answer_batch, and the loop's batch of 16).
        dict(name="static_decode", cap=300, record=record,
             command=[*chat, "--quant", "none", "--modes", "reference", "default", "--compile", "--decode", "static", "--profile-turn2",
                      *small_chat, *(["--greedy-check-tokens", "12", "--caption-images", "2", "--profile-tokens", "8"] if tiny else [])]),
        # What a user of each stage runs: stage 1 cannot use the feature cache (its random crops).
        dict(name="train_stage1", cap=120, record=train_record,
             command=[*train, "--stage", "1", "--modes", "reference", "default+packed+compile", *small_train]),
        dict(name="train_stage2", cap=150, record=train_record,
             command=[*train, "--stage", "2", "--modes", "reference", "default+cache+packed+compile", *small_train]),
    ]
    if not tiny:  # bitsandbytes has no CPU path for these loads
        listed.append(dict(name="chat_quant", cap=240, record=record, command=[*chat, "--quant", "8bit", "4bit", "--caption-images", "0"]))
    for step in listed:
        if "record" in step:
            step["command"] += ["--out", str(out / step["name"])]
    return listed


class Session:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline, self.start = out, time.monotonic() + budget_s, time.monotonic()
        self.log = (out / "session.log").open("a", buffering=1)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Nothing is fetched there: no Hub lookups, and no Hub kernels (transformers' default on a GPU).
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("USE_HUB_KERNELS", "0")
        self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="minigpt4-inductor-"))
        self.results: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def run(self, name: str, command: list[str], cap: float, reserve: float = 0.0) -> dict[str, Any]:
        """Run ``command`` for at most ``cap`` seconds and what is left of the budget (less ``reserve``)."""
        left = self.deadline - time.monotonic() - reserve
        result: dict[str, Any] = {"step": name, "command": command}
        if left < 10:
            result.update(skipped=f"{max(left, 0):.0f} s of the budget left")
            self.say(f"== {name}: skipped, {result['skipped']}")
            self.results.append(result)
            return result
        limit = min(cap, left)
        shown = " ".join(c if len(c) < 200 else "<script>" for c in command)
        self.say(f"== {name} (at most {limit:.0f} s): {shown}")
        began = time.monotonic()
        child = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        lines: list[str] = []

        def read() -> None:
            for line in child.stdout:
                lines.append(line)
                self.say(f"[{name}] {line.rstrip()}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc = child.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(child.pid, signal.SIGTERM)
            try:
                rc = child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                rc = None
            stop(child.pid, signal.SIGKILL)  # whatever the step started and left running
            if rc is None:
                rc = child.wait()
        reader.join(timeout=5)
        result.update(rc=rc, seconds=round(time.monotonic() - began, 1), timed_out=timed_out, output_tail="".join(lines[-20:]))
        self.say(f"== {name}: {'timed out after' if timed_out else f'rc {rc} in'} {result['seconds']} s")
        self.results.append(result)
        return result


def stop(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def headline(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """The figures a closing note needs from a step's record."""
    # finished: False when the step was stopped (its time limit) after saving some of its parts.
    if name.startswith("train"):
        stages = {stage: {"ratios": figures.get("ratios"), "goal": figures.get("goal")} for stage, figures in record.get("stages", {}).items()}
        return {"finished": record.get("finished"), **stages}
    fp16 = record.get("runs", {}).get("none", {})
    figures: dict[str, Any] = {"finished": record.get("finished"), "goals": record.get("goals"),
                               "copy_bandwidth_gb_s": record.get("copy_bandwidth_gb_s")}
    static = fp16.get("default", {}).get("static_decode")
    if static:
        figures["static_decode"] = {k: static.get(k) for k in ("decode_tokens_per_s", "decode_fraction_of_limit", "vs_generate",
                                                               "warmup_s", "greedy_vs_generate", "captioning")}
        # Where the time goes, per token: the loop's and generate's (the heaviest kernels are in the record).
        figures["static_decode"]["profile"] = {
            name: {k: v for k, v in profiled.items() if not k.startswith("top_")} if isinstance(profiled, dict) else profiled
            for name, profiled in (static.get("profile") or {}).items()
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where the results go (default: $OUT, the device tool's folder)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps together (the device tool allows 600 a call)")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels, installed with --target (skipped if absent)")
    parser.add_argument("--only", nargs="+", help="run only these steps (by name), after wheels and environment")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the same steps in seconds (a smoke test)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required where $OUT is not set (the device tool sets it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    planned = steps(args.tiny, out, sys.executable)
    unknown = sorted(set(args.only or []) - {s["name"] for s in planned})
    if unknown:
        parser.error(f"--only: no step named {', '.join(unknown)}; the steps are {', '.join(s['name'] for s in planned)}")
    session = Session(out, args.budget)
    summary: dict[str, Any] = {"budget_s": args.budget, "tiny": args.tiny, "steps": session.results}

    def save() -> None:
        """session.json as it stands: after every step, so a call cut short keeps what was done."""
        summary["seconds"] = round(time.monotonic() - session.start, 1)
        summary["failed"] = [r["step"] for r in session.results if r.get("rc") not in (0, None) or r.get("timed_out")]
        summary["skipped"] = [r["step"] for r in session.results if "skipped" in r]
        (out / "session.json").write_text(json.dumps(summary, indent=2) + "\n")

    def finish(rc: int) -> int:
        save()
        session.say(f"session: {summary['seconds']} s; failed: {', '.join(summary['failed']) or 'none'}; "
                    f"skipped: {', '.join(summary['skipped']) or 'none'}")
        for name, figures in summary.get("headlines", {}).items():
            session.say(f"{name}: {json.dumps(figures)}")
        return rc or (1 if summary["failed"] else 0)

    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if wheels:
        site = Path(tempfile.mkdtemp(prefix="minigpt4-site-"))
        done = session.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                      "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], cap=120)
        if done.get("rc") != 0:
            return finish(1)
        session.env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
        summary["site"] = str(site)
    else:
        session.env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), session.env.get("PYTHONPATH", "")] if p)
        session.say(f"== wheels: none under {args.wheels}; the machine's own packages are used")
    env = session.run("environment", [sys.executable, "-c", ENVIRONMENT], cap=60)
    if env.get("rc") != 0:
        return finish(1)
    try:
        summary["environment"] = json.loads(env["output_tail"].strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        summary["environment"] = {"unparsed": env["output_tail"]}
    summary["headlines"] = {}
    for step in planned:
        if args.only and step["name"] not in args.only:
            continue
        result = session.run(step["name"], step["command"], step["cap"])
        record = out / step["name"] / step["record"] if step.get("record") else None
        if record is not None and record.is_file():
            result["record"] = str(record.relative_to(out))
            try:
                summary["headlines"][step["name"]] = headline(step["name"], json.loads(record.read_text()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:  # the record itself came back
                summary["headlines"][step["name"]] = {"unreadable": f"{type(err).__name__}: {err}"}
        save()
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
