"""Training-step and inference speed of the segmentation U-Net in float32 and bfloat16 on this CPU.

Usage (from the repository root): ``python benchmarks/unet_speed.py [--steps 10] [--precisions fp32 bf16]
[--encoders efficientnet-lite0 ...]``

Prints, for a few widths and the pretrained-encoder U-Nets, the seconds per training step (8 random crops of 128 px, forward + backward + AdamW, as in
``scellst.im.train_segmenter``) and the inference throughput on a 1,024 x 1,024 px image, for ``precision="fp32"``
and ``"bf16"`` (bfloat16 is only fast on CPUs with native support; ``use_bf16("auto")`` says whether this one has).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def step_seconds(base_channels: int, depth: int, precision: str, steps: int, encoder: str = "") -> float:
    import torch

    from scellst.models import UNetConfig, build_unet
    from scellst.models._unet import use_bf16

    torch.manual_seed(0)
    config = UNetConfig(base_channels=base_channels, depth=depth, encoder=encoder)
    net = build_unet(config).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(8, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    target = torch.rand(8, 2, 128, 128)
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(precision)):
            out = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[2:]))


def inference_mp_per_s(base_channels: int, depth: int, precision: str, encoder: str = "") -> float:
    import torch

    from scellst.models import NucleusUNet, UNetConfig, build_unet

    config = UNetConfig(base_channels=base_channels, depth=depth, precision=precision, encoder=encoder)
    model = NucleusUNet(config=config, state_dict=build_unet(config).state_dict())
    rgb = np.random.default_rng(0).integers(0, 255, size=(1024, 1024, 3), dtype=np.uint8)
    model.predict_maps(rgb[:256, :256])  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        model.predict_maps(rgb)
    return rgb.shape[0] * rgb.shape[1] / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--encoders", nargs="*", default=["efficientnet-lite0", "efficientnet-lite2"],
                        help="pretrained-encoder U-Nets to time too (train_segmenter(encoder=...))")  # fmt: skip
    args = parser.parse_args()
    import torch

    from scellst.models._unet import use_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; native bfloat16: {use_bf16('auto')}")
    nets = [(16, 3, ""), (32, 3, ""), (32, 4, "")] + [(16, 3, e) for e in args.encoders]
    for base, depth, encoder in nets:
        row = []
        for precision in args.precisions:
            s = step_seconds(base, depth, precision, args.steps, encoder)
            mp = inference_mp_per_s(base, depth, precision, encoder)
            row.append(f"{precision}: {s:.3f} s/step, network {mp:.2f} MP/s")
        name = f"encoder={encoder}" if encoder else f"base_channels={base}, depth={depth}"
        print(f"{name}: " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
