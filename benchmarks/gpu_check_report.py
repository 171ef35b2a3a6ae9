"""One-page report of benchmarks/gpu_check.sh from what its stages left in REPORT_DIR.

Reads (each optional: a missing piece is reported as missing, never guessed):
  machine.json                 GPU name, capability, memory, torch/CUDA versions, archs built
  stages.tsv                   stage, status, seconds, detail (written by gpu_check.sh)
  junit-<file>.xml             pytest results per test file
  env.json                     fastft._backend.describe(): built backends, path per op and device
  bench-<mode>/results.json    `fastft bench` results per mode (lora, full)
Writes REPORT_DIR/REPORT.md and prints nothing else (the shell script cats it).

Usage: python benchmarks/gpu_check_report.py REPORT_DIR [--total-seconds N]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The targets of issue 17 (one H100, Llama-3.2-1B shapes, batch 8 x 1024, bf16)
TARGETS = {"lora": "tokens/s >= 1.5x HF+PEFT, peak memory <= 0.6x", "full": "tokens/s >= 1.3x HF"}
BUDGET_S = 480


def _load_json(path: Path):
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")  # a log: one JSON object among warnings
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else None
        except json.JSONDecodeError:
            return None


def stages(report: Path) -> list[dict]:
    path = report / "stages.tsv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def junit(report: Path) -> list[dict]:
    """Per test file: tests, failures, errors, skipped, seconds, first failing test names."""
    out = []
    for path in sorted(report.glob("junit-*.xml")):
        name = path.stem[len("junit-"):] + ".py"
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            out.append({"file": name, "status": f"unreadable junit ({e})"})
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        secs = sum(float(s.get("time", 0.0)) for s in suites)
        failed = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for c in root.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        ok = n["failures"] == 0 and n["errors"] == 0
        out.append({"file": name, "status": "PASS" if ok else "FAIL", "seconds": secs, "failed": failed, **n})
    return out


def _mem_mb(side: dict) -> tuple[str, float | None]:
    """The side's peak memory: the GPU figure when the bench reports one, else peak RSS."""
    for key in ("peak_gpu_mb", "max_memory_allocated_mb", "peak_mem_mb", "peak_memory_mb"):
        if isinstance(side.get(key), (int, float)):
            return key, float(side[key])
    for key, value in side.items():  # any other GPU memory figure in MB
        if isinstance(value, (int, float)) and ("gpu" in key or "cuda" in key) and key.endswith("_mb"):
            return key, float(value)
    if isinstance(side.get("peak_rss_mb"), (int, float)):
        return "peak_rss_mb", float(side["peak_rss_mb"])
    return "", None


def bench(report: Path, mode: str) -> dict | None:
    res = _load_json(report / f"bench-{mode}" / "results.json")
    if not isinstance(res, dict) or "hf" not in res or "fastft" not in res:
        return None
    row = {"mode": mode, "sides": {}}
    for side in ("hf", "fastft"):
        s = res[side]
        key, mem = _mem_mb(s)
        row["sides"][side] = {"tokens_per_s": s.get("tokens_per_s"), "median_step_s": s.get("median_step_s"),
                              "mem_mb": mem, "mem_key": key, "mfu": s.get("mfu"), "settings": s.get("settings", "")}
    r = res.get("ratios", {})
    row["speed_ratio"] = r.get("tokens_per_s")
    hf_mem, ff_mem = row["sides"]["hf"]["mem_mb"], row["sides"]["fastft"]["mem_mb"]
    row["mem_ratio"] = ff_mem / hf_mem if hf_mem and ff_mem is not None else None
    row["loss_ok"] = (res.get("loss_check") or {}).get("ok")
    row["args"] = res.get("args", {})
    return row


def _fmt(x, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def render(report: Path, total_seconds: float | None = None) -> str:
    machine = _load_json(report / "machine.json") or {}
    env = _load_json(report / "env.json") or {}
    lines = ["# fastft GPU check", ""]
    lines.append(f"GPU: {machine.get('gpu', 'unknown')} (sm_{machine.get('capability', '?')}, "
                 f"{machine.get('memory_mb', '?')} MiB); torch {machine.get('torch', '?')} "
                 f"(CUDA {machine.get('torch_cuda', '?')}); built for FASTFT_CUDA_ARCHS={machine.get('archs', '?')}.")
    if env:
        lines.append(f"transformers {env.get('transformers', '?')}, triton {env.get('triton', '?')}, "
                     f"peft {env.get('peft', '?')}; fastft._C_cuda: {(env.get('built') or {}).get('fastft._C_cuda (cuda)', '?')}.")
    st = stages(report)
    total = total_seconds if total_seconds is not None else sum(float(s.get("seconds") or 0) for s in st)
    verdict = "within" if total <= BUDGET_S else "OVER"
    lines += ["", f"## Stages ({total:.0f} s in all, {verdict} the {BUDGET_S} s budget)", "",
              "| stage | status | seconds | detail |", "|---|---|---:|---|"]
    for s in st:
        lines.append(f"| {s.get('stage')} | {s.get('status')} | {s.get('seconds')} | {s.get('detail', '')} |")
    if not st:
        lines.append("| (no stages.tsv) | missing | | |")
    tests = junit(report)
    lines += ["", "## Tests (GPU subset)", "", "| file | result | passed | failed | skipped | seconds |",
              "|---|---|---:|---:|---:|---:|"]
    for t in tests:
        if "tests" not in t:
            lines.append(f"| {t['file']} | {t['status']} | | | | |")
            continue
        passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
        lines.append(f"| {t['file']} | {t['status']} | {passed} | {t['failures'] + t['errors']} | {t['skipped']} "
                     f"| {t['seconds']:.0f} |")
    if not tests:
        lines.append("| (no junit files) | missing | | | | |")
    for t in tests:
        for name in t.get("failed", [])[:5]:
            lines.append(f"- FAILED {t['file']}::{name}")
    lines += ["", "## fastft vs Hugging Face on this GPU", "",
              "| mode | side | tokens/s | step s | peak memory MB | MFU | loss curves |", "|---|---|---:|---:|---:|---:|---|"]
    summary = []
    for mode in ("lora", "full"):
        b = bench(report, mode)
        if b is None:
            lines.append(f"| {mode} | (no results) | | | | | |")
            continue
        for side, name in (("hf", "HF"), ("fastft", "fastft")):
            s = b["sides"][side]
            mem = _fmt(s["mem_mb"], ".0f") + ("" if s["mem_key"] in ("", "peak_gpu_mb", "max_memory_allocated_mb")
                                              else f" ({s['mem_key']})")
            lines.append(f"| {mode} | {name} | {_fmt(s['tokens_per_s'], '.0f')} | {_fmt(s['median_step_s'], '.3f')} "
                         f"| {mem} | {_fmt(s['mfu'], '.1%')} | {'agree' if b['loss_ok'] else 'DISAGREE' if b['loss_ok'] is False else 'n/a'} |")
        summary.append(f"- {mode}: tokens/s x{_fmt(b['speed_ratio'], '.2f')}, peak memory x{_fmt(b['mem_ratio'], '.2f')} "
                       f"(target: {TARGETS[mode]}); args {json.dumps(b['args'], sort_keys=True)}")
    lines += [""] + summary
    ops = env.get("ops_by_device") or {}
    lines += ["", "## Path per op", ""]
    lines += [f"- {op}: {path}" for op, path in ops.items()] or ["- (no env.json)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write REPORT_DIR/REPORT.md from benchmarks/gpu_check.sh's outputs.")
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--total-seconds", type=float, default=None, help="wall time of the whole check")
    args = ap.parse_args(argv)
    if not args.report_dir.is_dir():
        print(f"gpu_check_report: {args.report_dir} is not a folder", file=sys.stderr)
        return 2
    (args.report_dir / "REPORT.md").write_text(render(args.report_dir, args.total_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
