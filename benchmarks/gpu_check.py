"""Everything the CUDA path needs measured, in one command (under 8 minutes on an H100).

    python benchmarks/gpu_check.py                        # on a machine with CUDA
    python benchmarks/gpu_check.py --sections googlenet vit   # only some sections
    python benchmarks/gpu_check.py --device cpu --smoke   # every section's code, tiny, on a CPU

Five sections, each timed, each catching its own errors (the traceback is printed and the next
section runs), then a summary; the exit code is 1 if any section failed. Random weights and
generated data only: nothing is downloaded.
1. logger: the demo's SmallCNN trains on the device with `tb_microscope.Logger` (default
   schedule, probe, normalize), in blocks with and without `log()`; the architecture is
   captured in a process forked after CUDA is initialized, while training goes on. Prints the
   capture's time (from the first `log()` until its thread ends), the forks seen, the
   training-thread stall per snapshot, the step-time ratio with and without the Logger; checks
   that the manifest's architecture is "export" and that `open_run` + `render` draw a unit.
2. numerics: `benchmarks/numerics.py`'s own options and `measure` (GoogLeNet `inception4a`,
   then ResNet-50 `layer3.2` if time allows; the demo CNN without torchvision): ms per
   iteration of a batch of 16 units, and the difference, in uint8 levels, between the units
   rendered alone and inside that batch, and whether a repeat is identical. The engine's
   default (`default_numerics`) is marked.
3. googlenet: torchvision's GoogLeNet (init_weights=True) `inception4c`, 64 units at 224 px and
   512 iterations in one `tb_microscope.render` call (the engine's batches), after a warm-up:
   ms per unit, PASS / MISS against 20 ms; then the same units as one batch of 64, time
   allowing.
4. vit: ViT-B/16 at 224 px (torchvision's, else timm's), 64 units of the middle block at 256
   iterations: time, ms per unit, the engine's batch and peak CUDA memory
   (`torch.cuda.max_memory_allocated`).
5. preview: `benchmarks/preview_latency.py` in a subprocess on the device (ResNet-50
   `layer3.2`, 48 units on screen, the node opened 1 s after the run): time to the first
   preview and to every visible unit's.
torchvision and timm are optional: a part that needs a missing one is skipped with a line that
says so. The architecture's capture process gets TB_MICROSCOPE_CAPTURE_TIMEOUT=120 s unless set.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from pathlib import Path

import torch
from torch import nn

import tb_microscope

HERE = Path(__file__).resolve().parent
GOAL_MS_PER_UNIT = 20.0  # GoogLeNet inception4c, 224 px, 512 iterations
CAPTURE_THREAD = "tb_microscope-capture"  # the Logger's capture thread (logger.py)
NO_CUDA = "no CUDA device: nothing to check (run with --device cpu --smoke to exercise the script)"

# Sizes per mode. "full" is what a CUDA machine runs; "smoke" only exercises the code.
CONFIGS = {
    "full": {
        "budget_s": 450,  # optional parts are skipped once the run has used this much
        "train_steps": 400,  # per arm (baseline and logged)
        "train_block": 20,
        "train_size": 32,
        "train_batch": 128,
        "unit_size": 64,
        "unit_iterations": 64,
        "numerics_models": ["googlenet", "resnet50"],
        "numerics_size": 128,
        "numerics_iterations": 128,
        "numerics_batches": [1, 16],
        "numerics_check": 4,
        "googlenet_size": 224,
        "googlenet_iterations": 512,
        "googlenet_units": 64,
        "vit_size": 224,
        "vit_iterations": 256,
        "vit_units": 64,
        "preview_args": ["--look", "1"],
        "preview_timeout_s": 240,
    },
    "smoke": {
        "budget_s": 900,
        "train_steps": 30,
        "train_block": 10,
        "train_size": 32,
        "train_batch": 32,
        "unit_size": 32,
        "unit_iterations": 8,
        "numerics_models": ["googlenet"],
        "numerics_size": 64,
        "numerics_iterations": 4,
        "numerics_batches": [1, 4],
        "numerics_check": 2,
        "googlenet_size": 64,
        "googlenet_iterations": 8,
        "googlenet_units": 4,
        "vit_size": 64,
        "vit_iterations": 4,
        "vit_units": 4,
        "preview_args": ["--look", "0", "--units", "4", "--input-size", "64"],
        "preview_timeout_s": 500,
    },
}


class CheckFailed(Exception):
    """Something the CUDA path must do, it did not."""


class Skipped(Exception):
    """A section that cannot run here (a missing package); not a failure."""


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def version_of(name: str) -> str:
    if not has_module(name):
        return "absent"
    try:
        return getattr(importlib.import_module(name), "__version__", "present")
    except Exception as e:  # present but broken: say so rather than crash
        return f"present but fails to import ({type(e).__name__}: {e})"


def engine_name(name: str):
    """A name from the rendering engine (numerics, batch sizes), or None if it moved."""
    for module in ("numerics", "batching", "engine"):
        try:
            return getattr(importlib.import_module(f"tb_microscope.optvis.{module}"), name)
        except (ImportError, AttributeError):
            continue
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(numerics) -> str:
    if numerics is None:
        return "unknown"
    dtype = str(numerics.autocast).removeprefix("torch.") if numerics.autocast else ""
    parts = [
        f"{dtype} autocast" if dtype else "fp32",
        "tf32" if getattr(numerics, "tf32", False) else "",
        "oneDNN" if getattr(numerics, "onednn", False) else "",
        "channels-last" if getattr(numerics, "channels_last", False) else "",
    ]
    return ", ".join(p for p in parts if p)


def engine_plan(run, model, node: str, size: int, device: torch.device) -> str:
    """The numerics and batch size the engine picks for this render, where it can say."""
    usable, batch_size_for = engine_name("usable_numerics"), engine_name("batch_size_for")
    if usable is None or batch_size_for is None:
        return "the engine's numerics and batch: not available (engine functions moved)"
    target = run.node(node)
    numerics = usable(model, run, target, size, device)
    batch = batch_size_for(model, run, target, size, device, numerics)
    return f"the engine's numerics: {describe(numerics)}; its batch: {batch} units"


def logged_run(logdir: str, net: nn.Module, example: torch.Tensor, node: str):
    """`net` logged at step 0 with only `node`, read back; and the seconds the Logger took."""
    start = time.perf_counter()
    with tb_microscope.Logger(logdir, net, example, nodes=[node], steps=[0]) as logger:
        logger.log(0)
    seconds = time.perf_counter() - start
    run = tb_microscope.open_run(logdir)
    if run.architecture != "export":
        note = run.manifest.model.architecture.note
        raise CheckFailed(f"architecture captured as {run.architecture!r}, not export ({note})")
    return run, seconds


def load_benchmark(name: str) -> types.ModuleType:
    """Another script of this folder, as a module. Without torchvision, a stand-in module lets
    it import (its functions that do not build torchvision models still work)."""
    stand_in = None
    if not has_module("torchvision"):
        stand_in = sys.modules["torchvision"] = types.ModuleType("torchvision")
    try:
        spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if stand_in is not None:
            del sys.modules["torchvision"]


# --- 1. the Logger training on the device ---------------------------------------------------


def section_logger(args, cfg, device, clock) -> str:
    from tb_microscope.demo.data import MEAN, STD, make_images, normalize
    from tb_microscope.demo.model import SmallCNN

    forks = []
    os.register_at_fork(after_in_parent=lambda: forks.append(time.perf_counter()))
    torch.manual_seed(0)
    images, labels = make_images(1024, cfg["train_size"], seed=0)
    inputs, labels = normalize(images).to(device), labels.to(device)
    model = SmallCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(1)
    batch = cfg["train_batch"]

    def train_step() -> None:
        index = torch.randint(0, len(inputs), (batch,), generator=order).to(device)
        loss = nn.functional.cross_entropy(model(inputs[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(device)

    for _ in range(5):  # CUDA initialized, kernels and allocator warm, before any Logger
        train_step()
    if device.type == "cuda":
        say(f"CUDA initialized: {torch.cuda.is_initialized()}")

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logdir = f"{root}/run"
        start = time.perf_counter()
        logger = tb_microscope.Logger(
            logdir,
            model,
            inputs[:8],
            probe=inputs[:64],
            normalize=(MEAN, STD),
        )
        setup_s = time.perf_counter() - start
        forks_before = len(forks)
        baseline, logged = [], []
        logged_step = 0
        capture_start = capture_end = None
        thread_seen = False
        while logged_step < cfg["train_steps"]:
            for _ in range(cfg["train_block"]):
                start = time.perf_counter()
                train_step()
                baseline.append(time.perf_counter() - start)
            for _ in range(cfg["train_block"]):
                start = time.perf_counter()
                train_step()
                called = time.perf_counter()
                logger.log(logged_step)
                logged.append(time.perf_counter() - start)
                if capture_start is None and logger.records:
                    capture_start = called  # the first log(): the capture begins
                alive = any(t.name == CAPTURE_THREAD for t in threading.enumerate())
                thread_seen = thread_seen or alive
                if capture_start is not None and capture_end is None and not alive:
                    capture_end = time.perf_counter()
                logged_step += 1
        more, until = 0, time.perf_counter() + 120
        while capture_end is None and thread_seen and time.perf_counter() < until:
            train_step()  # training goes on while the capture finishes
            more += 1
            if not any(t.name == CAPTURE_THREAD for t in threading.enumerate()):
                capture_end = time.perf_counter()
        start = time.perf_counter()
        logger.flush()
        flush_s = time.perf_counter() - start
        if capture_end is None or not thread_seen:
            capture_end = time.perf_counter()  # it outlasted training, or was not seen
        capture_s = capture_end - capture_start
        logger.close()
        records = logger.records
        forks_seen = forks[forks_before:]

        run = tb_microscope.open_run(logdir)
        kind = run.architecture
        ours = [str(w.message) for w in caught if "tb_microscope" in str(w.message)]
        others = len(caught) - len(ours)
        base, with_logger = statistics.fmean(baseline), statistics.fmean(logged)
        first, rest = records[0], records[1:]
        stalls = [r.stall_s for r in rest] or [float("nan")]
        writes = [r.write_s for r in rest] or [float("nan")]
        without_first = (sum(logged) - first.stall_s) / len(logged) / base
        say(
            f"SmallCNN, {cfg['train_size']} px, batch {batch}, {device}; {len(baseline)} "
            f"baseline and {len(logged)} logged steps in blocks of {cfg['train_block']}; "
            f"{len(records)} snapshots (steps {run.steps[0]} to {run.steps[-1]})",
            f"Logger set-up (nodes found by running the model): {setup_s * 1e3:.0f} ms",
            f"first log() stall (host copy + CPU copy, capture started): "
            f"{first.stall_s * 1e3:.1f} ms",
            f"architecture capture, from the first log() until its thread ended (training went "
            f"on): {capture_s:.2f} s"
            + (f" ({more} more training steps ran until it ended)" if more else "")
            + ("" if thread_seen else " (capture thread not seen: timed up to flush() instead)"),
            f"forks while capturing: {len(forks_seen)} (the capture's child process: expected 1 "
            f"on Linux)",
            f"snapshot stall on the training thread: median "
            f"{statistics.median(stalls) * 1e3:.2f} ms, max {max(stalls) * 1e3:.2f} ms; "
            f"background write median {statistics.median(writes) * 1e3:.1f} ms, "
            f"{rest[0].bytes if rest else 0:,} bytes",
            f"step time: baseline {base * 1e3:.2f} ms, with the Logger {with_logger * 1e3:.2f} "
            f"ms; ratio {with_logger / base:.3f} (without the first snapshot "
            f"{without_first:.3f})",
            f"flush() at the end: {flush_s * 1e3:.0f} ms",
            f"manifest architecture kind: {kind!r}",
            f"warnings: {len(ours)} from tb_microscope, {others} others",
        )
        for message in ours:
            say(f"  tb_microscope warned: {message}")
        for w in {f"{w.category.__name__}: {w.message}": w for w in caught}.values():
            if "tb_microscope" not in str(w.message):  # a fork in a threaded process, say
                say(f"  {w.category.__name__}: {str(w.message).splitlines()[0][:200]}")
        problems = []
        if kind != "export":
            note = run.manifest.model.architecture.note
            problems.append(f"architecture kind {kind!r}, not 'export' ({note})")
        if sys.platform.startswith("linux") and not forks_seen:
            problems.append("no fork seen: the capture did not run in a child process")
        if any("capturing in this process instead" in m for m in ours):
            problems.append("the capture's child gave no answer: it was redone in-process")
        if problems:
            raise CheckFailed("; ".join(problems))

        node, step = "conv3", run.steps[-1]
        start = time.perf_counter()
        result = tb_microscope.render(
            run,
            step,
            node,
            [0, 1],
            size=cfg["unit_size"],
            iterations=cfg["unit_iterations"],
            device=device,
        )
        synchronize(device)
        render_s = time.perf_counter() - start
    say(
        f"render of {node} units 0-1 at step {step} from open_run "
        f"({cfg['unit_size']} px, {cfg['unit_iterations']} iterations): {render_s:.2f} s, "
        f"images {result.images.shape}, pixel std {result.images.std():.1f}"
    )
    if result.images.shape != (2, cfg["unit_size"], cfg["unit_size"], 3):
        raise CheckFailed(f"render gave images of shape {result.images.shape}")
    return (
        f"capture {capture_s:.2f} s in a forked child, step-time ratio {with_logger / base:.3f}, "
        f"architecture {kind}"
    )


# --- 2. the numerics table ----------------------------------------------------------------


def section_numerics(args, cfg, device, clock) -> str:
    numerics_py = load_benchmark("numerics")
    default_numerics = engine_name("default_numerics")
    options = numerics_py.options(device)
    largest = max(cfg["numerics_batches"])
    bench_args = argparse.Namespace(
        size=cfg["numerics_size"],
        iterations=cfg["numerics_iterations"],
        batches=cfg["numerics_batches"],
        check=cfg["numerics_check"],
    )
    if has_module("torchvision"):
        models = {name: numerics_py.MODELS[name] for name in cfg["numerics_models"]}
    else:
        from tb_microscope.demo.model import SmallCNN

        say("torchvision absent: the numerics table on the demo SmallCNN conv2 instead")
        models = {"SmallCNN": (lambda size: SmallCNN(), "conv2")}
    say(
        f"{device}, {bench_args.size} px, {bench_args.iterations} iterations; a batch of "
        f"{largest} units timed; units 0-{bench_args.check - 1} rendered alone and compared with "
        f"the same units in the batch (uint8 levels, mean / max); options from "
        f"benchmarks/numerics.py"
    )
    summary, failed = [], []
    for i, (name, (build, node)) in enumerate(models.items()):
        if i and clock.over_budget():
            say(f"\n{name} {node}: skipped, the run has used {clock.used():.0f} s of its budget")
            continue
        with tempfile.TemporaryDirectory() as logdir:
            torch.manual_seed(0)
            x = torch.rand(2, 3, bench_args.size, bench_args.size)
            run, log_s = logged_run(logdir, build(bench_args.size), x, node)
            model = run.load_model(0, device)
            chosen = default_numerics(device, model) if default_numerics else None
            say(
                f"\n{name} {node} (logged and captured in {log_s:.1f} s)",
                f"  {'option':34} {'ms/iter':>8} {'units/s':>8}  {'batch ' + str(largest):>13}"
                f"  {'invariant':9}  repeats",
            )
            measured = {}
            for label, numerics in options.items():
                try:
                    r = numerics_py.measure(run, model, node, numerics, bench_args, device)
                except Exception:
                    traceback.print_exc()
                    say(f"  {label:34} FAILED (traceback above)")
                    failed.append(f"{name} {label}")
                    continue
                mean, most = r["differences"][largest]
                ms = r["seconds"] / bench_args.iterations * 1e3
                mark = " (default)" if numerics == chosen else ""
                invariant = "yes" if most == 0 else f"no ({mean:.2f})"
                say(
                    f"  {label + mark:34} {ms:8.2f} {r['units_per_s']:8.2f}  "
                    f"{mean:6.2f} / {most:3d}  {invariant:9}  "
                    f"{'identical' if r['repeatable'] else 'DIFFER'}"
                )
                if mark:
                    summary.append(f"{name} default {label}: {ms:.1f} ms/iter, {invariant}")
                if r["repeatable"]:
                    measured[label] = (ms, mean, most)
            # the rule default_numerics follows: the fastest whose mean difference stays within
            # 1 level and whose repeats are identical
            for what, fits in (
                ("exactly", lambda m, x: x == 0),
                ("within 1 level", lambda m, x: m <= 1),
            ):
                fitting = {k: v[0] for k, v in measured.items() if fits(v[1], v[2])}
                best = min(fitting, key=fitting.get) if fitting else None
                say(
                    f"  fastest option batch-invariant {what}: "
                    + (f"{best} ({fitting[best]:.2f} ms/iter)" if best else "none")
                )
    if failed:
        raise CheckFailed(f"options that failed: {', '.join(failed)}")
    return "; ".join(summary) or "no default option measured"


# --- 3. GoogLeNet inception4c: ms per unit ------------------------------------------------


def section_googlenet(args, cfg, device, clock) -> str:
    if not has_module("torchvision"):
        raise Skipped("torchvision absent: GoogLeNet ms per unit not measured")
    import torchvision

    try:
        from tb_microscope.optvis.param import PAD
    except ImportError:
        PAD = 12
    size, iterations, count = (cfg[f"googlenet_{k}"] for k in ("size", "iterations", "units"))
    node = "inception4c"
    with tempfile.TemporaryDirectory() as logdir:
        torch.manual_seed(0)
        net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
        x = torch.rand(2, 3, size + 2 * PAD, size + 2 * PAD)
        run, log_s = logged_run(logdir, net, x, node)
        model = run.load_model(0, device)
        units = list(range(count))
        say(
            f"GoogLeNet {node}, {count} units, {size} px, {iterations} iterations, {device} "
            f"(logged and captured in {log_s:.1f} s)",
            engine_plan(run, model, node, size, device),
        )
        start = time.perf_counter()
        tb_microscope.render(
            run, 0, node, units[:2], size=size, iterations=4, device=device, model=model
        )
        synchronize(device)
        say(f"warm-up (2 units, 4 iterations): {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        result = tb_microscope.render(
            run, 0, node, units, size=size, iterations=iterations, device=device, model=model
        )
        synchronize(device)
        seconds = time.perf_counter() - start
        per_unit = seconds / count * 1e3
        verdict = "PASS" if per_unit <= GOAL_MS_PER_UNIT else "MISS"
        grey = int(sum(image.std() < 2 for image in result.images))
        say(
            f"engine's batches: {seconds:.2f} s for {count} units: {per_unit:.1f} ms per unit, "
            f"{count / seconds:.1f} units/s, {grey} grey pictures; goal <= "
            f"{GOAL_MS_PER_UNIT:.0f} ms per unit: {verdict}"
        )
        extra = ""
        if clock.over_budget():
            say(f"one batch of {count}: skipped, the run has used {clock.used():.0f} s")
        else:
            start = time.perf_counter()
            tb_microscope.render(
                run,
                0,
                node,
                units,
                size=size,
                iterations=iterations,
                device=device,
                model=model,
                batch_size=count,
            )
            synchronize(device)
            one = time.perf_counter() - start
            say(
                f"one batch of {count}: {one:.2f} s, {one / count * 1e3:.1f} ms per unit "
                f"({'PASS' if one / count * 1e3 <= GOAL_MS_PER_UNIT else 'MISS'})"
            )
            extra = f", one batch of {count}: {one / count * 1e3:.1f} ms"
    return f"{per_unit:.1f} ms per unit ({verdict} against {GOAL_MS_PER_UNIT:.0f} ms){extra}"


# --- 4. ViT-B/16 at 224 px: memory ---------------------------------------------------------


def section_vit(args, cfg, device, clock) -> str:
    size, iterations, count = (cfg[f"vit_{k}"] for k in ("size", "iterations", "units"))
    torch.manual_seed(0)
    if has_module("torchvision"):
        import torchvision

        net = torchvision.models.vit_b_16(weights=None, image_size=size)
        node, source = "encoder.layers.encoder_layer_6", "torchvision vit_b_16"
    elif has_module("timm"):
        try:
            import timm
        except Exception as e:  # timm wants torchvision for some of its modules
            raise Skipped(f"torchvision absent and timm fails to import ({e})") from None
        net = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size)
        node, source = "blocks.6", "timm vit_base_patch16_224"
    else:
        raise Skipped("neither torchvision nor timm: ViT-B/16 not measured")
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as logdir:
        run, log_s = logged_run(logdir, net, torch.rand(2, 3, size, size), node)
        del net
        model = run.load_model(0, device)
        units = list(range(count))
        say(
            f"{source} {node}, {count} units, {size} px, {iterations} iterations, {device} "
            f"(logged and captured in {log_s:.1f} s)",
            engine_plan(run, model, node, size, device),
        )
        tb_microscope.render(
            run, 0, node, units[:2], size=size, iterations=2, device=device, model=model
        )
        synchronize(device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = tb_microscope.render(
            run, 0, node, units, size=size, iterations=iterations, device=device, model=model
        )
        synchronize(device)
        seconds = time.perf_counter() - start
    grey = int(sum(image.std() < 2 for image in result.images))
    say(
        f"{seconds:.2f} s for {count} units: {seconds / count * 1e3:.1f} ms per unit, "
        f"{grey} grey pictures"
    )
    if not cuda:
        say("peak CUDA memory: not on CUDA")
        return f"{seconds / count * 1e3:.1f} ms per unit (no CUDA memory on {device})"
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    total = torch.cuda.get_device_properties(device).total_memory
    say(
        f"peak CUDA memory: {peak / 2**30:.2f} GiB allocated ({resident / 2**30:.2f} GiB before "
        f"the render: weights and the like), {reserved / 2**30:.2f} GiB reserved, of "
        f"{total / 2**30:.1f} GiB"
    )
    return f"{seconds / count * 1e3:.1f} ms per unit, peak {peak / 2**30:.2f} GiB, no OOM"


# --- 5. the tab's preview latency ---------------------------------------------------------


def section_preview(args, cfg, device, clock) -> str:
    if not has_module("torchvision"):
        raise Skipped("torchvision absent: benchmarks/preview_latency.py needs its ResNet-50")
    timeout = cfg["preview_timeout_s"]
    if not args.smoke:
        timeout = max(90, min(timeout, clock.left()))
    command = [
        sys.executable,
        str(HERE / "preview_latency.py"),
        "--device",
        str(device),
        *cfg["preview_args"],
    ]
    say(f"$ {' '.join(command[1:])}  (timeout {timeout:.0f} s)")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        for stream in (e.stdout, e.stderr):
            text = stream.decode() if isinstance(stream, bytes) else stream
            if text:
                say(*text.rstrip().splitlines()[-20:])
        raise CheckFailed(f"preview_latency.py gave no result in {timeout:.0f} s") from None
    if proc.stdout.strip():
        say(*proc.stdout.rstrip().splitlines())
    if proc.returncode != 0:
        say(*proc.stderr.rstrip().splitlines()[-30:])
        raise CheckFailed(f"preview_latency.py exited with {proc.returncode}")
    first = next((ln for ln in proc.stdout.splitlines() if "first preview" in ln), "")
    return first.split(":", 1)[-1].strip() or "done (see above)"


# --- the run -------------------------------------------------------------------------------

SECTIONS = {
    "logger": ("1. Logger training on the device, capture in a forked child", section_logger),
    "numerics": ("2. numerics: ms per iteration and batch invariance", section_numerics),
    "googlenet": ("3. GoogLeNet inception4c: ms per unit", section_googlenet),
    "vit": ("4. ViT-B/16: a middle block's units, peak memory", section_vit),
    "preview": ("5. the tab's preview latency", section_preview),
}


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.used()

    def over_budget(self) -> bool:
        return self.left() <= 0


def header(device: torch.device, args) -> None:
    say(
        f"gpu_check: device {device}{' (smoke: tiny sizes)' if args.smoke else ''}",
        f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'})"
        f", tb_microscope {tb_microscope.__version__}, engine version "
        f"{getattr(importlib.import_module('tb_microscope.optvis'), 'ENGINE_VERSION', '?')}",
        f"torchvision {version_of('torchvision')}, timm {version_of('timm')}",
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"TB_MICROSCOPE_CAPTURE_TIMEOUT={os.environ.get('TB_MICROSCOPE_CAPTURE_TIMEOUT')}",
    )
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        say(
            f"{torch.cuda.get_device_name(device)}: {p.total_memory / 2**30:.1f} GiB, compute "
            f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, bf16 supported: "
            f"{torch.cuda.is_bf16_supported()}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise the code")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        say(NO_CUDA)
        return 0
    os.environ.setdefault("TB_MICROSCOPE_CAPTURE_TIMEOUT", "120")
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    if device.type != "cuda" and not args.smoke:
        say("note: full sizes on a CPU take far longer than 8 minutes (--smoke shrinks them)")
    clock = Clock(cfg["budget_s"])
    header(device, args)
    results = []
    for key in args.sections:
        title, function = SECTIONS[key]
        say("", f"=== {title} ===")
        start = time.perf_counter()
        try:
            status, figure = "OK", function(args, cfg, device, clock)
        except Skipped as e:
            status, figure = "SKIP", str(e)
            say(f"SKIPPED: {e}")
        except Exception as e:
            traceback.print_exc()
            sys.stderr.flush()
            status, figure = "FAIL", f"{type(e).__name__}: {str(e).strip()[:300]}"
            say(f"FAILED: {figure}")
        if device.type == "cuda":
            try:  # a section's memory back before the next; a broken context must not stop us
                torch.cuda.empty_cache()
            except Exception as e:
                say(f"torch.cuda.empty_cache() failed: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - start
        say(f"--- {key}: {status} in {seconds:.1f} s")
        results.append((key, status, seconds, figure))
    total = clock.used()
    say("", "=== summary ===")
    for key, status, seconds, figure in results:
        say(f"{key:10} {status:4} {seconds:6.1f} s  {figure}")
    failed = [key for key, status, _, _ in results if status == "FAIL"]
    say(
        f"total {total:.0f} s ({'under' if total < 480 else 'OVER'} 8 minutes); "
        + (f"FAILED: {', '.join(failed)}" if failed else "no section failed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
