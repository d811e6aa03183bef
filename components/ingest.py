from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Markdown, Output

from components.image import TRAIN_IMAGE


# KFP reads the outputs from the NamedTuple(...) call in the signature (the function's source travels
# alone into the container), a form mypy refuses as a type: hence the ignore on that line.
@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def ingest(
    data_uri: str,
    dataset: Output[Dataset],
    validation_report: Output[Artifact],
    validation_summary: Output[Markdown],
    seed: int,
    valid_fraction: float,
    test_fraction: float,
    window_level: float,
    window_width: float,
    s3_endpoint_url: str,
) -> NamedTuple("IngestOutputs", [("fingerprint", str), ("images", int)]):  # type: ignore[valid-type]
    """Fetch, validate, de-duplicate and split the dataset; report where every file went."""
    import json
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from chest_ct import show_progress
    from chest_ct.duplicates import DuplicateChainError
    from chest_ct.ingest import build_dataset
    from chest_ct.ingest_report import report_markdown
    from chest_ct.records import DatasetError
    from chest_ct.sources import DataSourceError, fetch_dataset
    from chest_ct.window import Window

    show_progress()
    try:
        window = Window(level=window_level, width=window_width)
    except ValueError as err:
        raise SystemExit(f"ingest: {err}") from None
    with tempfile.TemporaryDirectory() as tmp:
        # A data problem ends in one line naming the URI or file and what was expected, no traceback.
        try:
            fetched = fetch_dataset(data_uri, Path(tmp), s3_endpoint_url=s3_endpoint_url or None)
            report = build_dataset(
                fetched.root,
                Path(dataset.path),
                seed=seed,
                valid_fraction=valid_fraction,
                test_fraction=test_fraction,
                source_uri=data_uri,
                refused=[asdict(r) for r in fetched.refused],
                window=window,
            )
        except (DataSourceError, DatasetError, DuplicateChainError) as err:
            raise SystemExit(f"ingest: {err}") from None
    Path(validation_report.path).write_text(json.dumps(report, indent=2))
    Path(validation_summary.path).write_text(report_markdown(report))
    dataset.metadata.update(fingerprint=report["fingerprint"], images=report["images"], counts=report["counts"])
    validation_report.metadata.update(
        files=report["files"],
        leaks=len(report["leaks"]),
        excluded=len(report["excluded"]),
        duplicate_groups=len(report["duplicate_groups"]),
    )
    print(report_markdown(report), flush=True)
    return (report["fingerprint"], report["images"])
