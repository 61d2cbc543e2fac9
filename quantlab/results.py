"""Result files and tables in the papers' layout."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV through a temporary file, so an interrupted run never leaves a truncated table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def psnr_ssim_table(summary: pd.DataFrame, index: tuple[str, ...] = ("scale", "method")) -> pd.DataFrame:
    """Rows ``index``, one column per dataset holding ``PSNR/SSIM`` (2 and 4 decimals), as the papers print."""
    cells = summary.assign(cell=[f"{p:.2f}/{s:.4f}" for p, s in zip(summary["psnr"], summary["ssim"])])
    table = cells.pivot_table(index=list(index), columns="dataset", values="cell", aggfunc="first", sort=False)
    return table[[d for d in summary["dataset"].unique()]].rename_axis(columns=None)
