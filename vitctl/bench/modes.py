"""The sizes `vitctl bench` runs at: full (B/16), quick (S/16) and tiny (the tests' models)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    batches: tuple[int, ...]  # forward batches
    train_batch: int
    warmup: int
    iters: int
    gate_budget_s: float
    gemm_min_time: float
    gemm_max_reps: int
    onednn: bool  # also probe oneDNN's fp32 GEMM
    size: str = "B"  # a ViTConfig variant size; "tiny" for the test models

    def configs(self) -> dict:
        """{"classic": ViTConfig, "parallel": ViTConfig} at this mode's size."""
        from vitctl.config import ViTConfig

        if self.size == "tiny":
            small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8, "image_size": 32, "num_classes": 10}
            return {
                "classic": ViTConfig.from_variant("mu/16", **small),
                "parallel": ViTConfig.from_variant("vit22b-mu/16", pool="tok", **small),
            }
        return {
            "classic": ViTConfig.from_variant(f"{self.size}/16"),
            "parallel": ViTConfig.from_variant(f"vit22b-{self.size}/16", pool="tok"),
        }

    def label(self, config: str) -> str:
        return f"{config} {'tiny' if self.size == 'tiny' else self.size + '/16'}"


MODES = {
    "full": Mode("full", (1, 8, 32), 8, warmup=1, iters=3, gate_budget_s=120, gemm_min_time=0.3, gemm_max_reps=10, onednn=True),
    "quick": Mode("quick", (1, 8), 8, warmup=1, iters=1, gate_budget_s=15, gemm_min_time=0.1, gemm_max_reps=4, onednn=False, size="S"),
    "tiny": Mode("tiny", (1, 2), 2, warmup=0, iters=1, gate_budget_s=0, gemm_min_time=0.0, gemm_max_reps=1, onednn=False, size="tiny"),
}
