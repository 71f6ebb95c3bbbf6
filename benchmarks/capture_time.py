"""Capture time per architecture at its natural size, on full-size models with random weights.

    python benchmarks/capture_time.py [--models resnet50 swin_t ...] [--size 224]

Each model is logged in a fresh process, as a training script would: `Logger(...)` (which runs
the model at two input sizes to find its nodes' layouts), then `log(0)` (the training thread's
stall: a host copy of the weights and a CPU copy of the model), then `flush()`, which waits for
the architecture, captured on a thread of its own. Prints, per model: the Logger's set-up, the
first log()'s stall, the capture, the input sizes the captured program takes, the number of
nodes by layout, and what torch printed meanwhile (lines on stderr).
"""

import argparse
import json
import subprocess
import sys
import tempfile

MODELS = {
    "resnet50": "torchvision.models.resnet50()",
    "googlenet": "torchvision.models.googlenet(aux_logits=False, init_weights=False)",
    "efficientnet_b0": "torchvision.models.efficientnet_b0()",
    "convnext_tiny": "torchvision.models.convnext_tiny()",
    "vit_b_16": "torchvision.models.vit_b_16()",
    "swin_t": "torchvision.models.swin_t()",
    "timm_vit_small": "timm.create_model('vit_small_patch16_224', pretrained=False)",
    "timm_convnext_tiny": "timm.create_model('convnext_tiny', pretrained=False)",
    "timm_efficientnet_b0": "timm.create_model('efficientnet_b0', pretrained=False)",
    "timm_swin_tiny": "timm.create_model('swin_tiny_patch4_window7_224', pretrained=False)",
    "hf_vit": "transformers.ViTForImageClassification(transformers.ViTConfig())",
    "hf_convnext": "transformers.ConvNextForImageClassification(transformers.ConvNextConfig())",
    "hf_swin": "transformers.SwinForImageClassification(transformers.SwinConfig())",
    "hf_dinov2": "transformers.Dinov2ForImageClassification(transformers.Dinov2Config())",
    "hf_resnet": "transformers.ResNetForImageClassification(transformers.ResNetConfig())",
}

CHILD = """
import collections, json, sys, time, warnings
import torch, torchvision, timm, transformers
import tb_microscope
warnings.simplefilter("ignore")
torch.manual_seed(0)
model = {expression}
x = torch.rand(2, 3, {size}, {size})
start = time.perf_counter()
logger = tb_microscope.Logger(sys.argv[1], model, x, steps=[0])
setup = time.perf_counter() - start
start = time.perf_counter()
logger.log(0)
stall = time.perf_counter() - start
logger.flush()
captured = time.perf_counter() - start
logger.close()
run = tb_microscope.open_run(sys.argv[1])
dims = {{d["name"]: d for d in run.input_spec.dims}}
height = dims["height"]
sizes = (f"{{height['size']}} only" if height["size"] is not None
         else f"{{height['min']}} to {{height['max'] or 'any'}}")
print(json.dumps({{
    "setup_s": setup, "stall_s": stall, "capture_s": captured, "sizes": sizes,
    "architecture": run.architecture, "note": run.manifest.model.architecture.note,
    "layouts": dict(collections.Counter(n.layout for n in run.nodes)),
}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"{'model':22} {'set-up':>7} {'log()':>7} {'capture':>8}  sizes taken      nodes")
    for name in args.models:
        code = CHILD.format(expression=MODELS[name], size=args.size)
        with tempfile.TemporaryDirectory() as run_dir:
            proc = subprocess.run(
                [sys.executable, "-c", code, run_dir], capture_output=True, text=True
            )
        if proc.returncode != 0:
            print(f"{name:22} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        printed = len(proc.stderr.strip().splitlines())
        layouts = ", ".join(f"{k} {v}" for k, v in r["layouts"].items())
        print(
            f"{name:22} {r['setup_s']:6.1f}s {r['stall_s']:6.2f}s {r['capture_s']:7.1f}s  "
            f"{r['sizes']:15}  {layouts}; torch printed {printed} lines"
            + (f"; note: {r['note']}" if r["note"] else "")
        )


if __name__ == "__main__":
    main()
