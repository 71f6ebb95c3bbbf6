"""Runs kept in MLflow: the Logger's uploader, and the local mirror the reading side opens.

An MLflow run that holds tb_microscope data carries the tag `tb_microscope.run` (our run id) and,
under its artifacts' `tb_microscope/`, the same files as a run directory's plugin folder (see
`store/paths.py`): manifest.json, model.pt2 or model.pkl, probe/images.safetensors and
snapshots/step-*.safetensors. Artifact stores have no atomic rename, so one more file,
`tb_microscope/index.json`, says what is complete: it is uploaded after the files it lists, and
readers use nothing else. Each listed file comes with its size and SHA-256 (snapshots with their
size and checksum), checked after download: a file caught half-uploaded or half-replaced is
not used, and is fetched again at the next sync.

Writing (`ArtifactUploader`): the Logger's writer writes into a local staging run directory as
usual; a thread uploads each finished file and then the index, and deletes a staged snapshot once
the index that lists it is uploaded. While the tracking server is unreachable the snapshots wait
on disk (bounded by the Logger's `backlog_mb`), retried with backoff; training never waits.

Reading (`MlflowRunStore`): a `RunStore` over a mirror in the user's cache. `sync()` fetches the
index and whatever small files changed; snapshots are fetched when first read, each once.

The modules, by job:

`index.json`'s format is `store/index.py`, shared with object storage's uploader.

- `common`: `runs:/` URIs, importing mlflow, the tracking URI, the local folders (mirror and
  staging), the tag, and what the others share (errors, the active run);
- `upload`: the training side: `ArtifactUploader` (on the shared `store/upload.py` loop),
  `adopt_remote`, `uploaded_steps`;
- `mirror`: the reading side: `MlflowRunStore` (on the shared `store/mirror.py`);
- `listing`: the runs a tracking server holds (`list_runs`), and the TensorBoard plugin's list of
  them (`MlflowRuns`).

None of them imports mlflow itself until an MLflow run is used: `import tb_microscope` (and a
Logger that logs into a directory) never does.
"""

from ..index import Index
from .common import (
    TAG,
    MlflowUnavailableError,
    active_run_id,
    import_mlflow,
    mirror_dir,
    parse_mlflow_uri,
    staging_dir,
    tracking_uri,
)
from .listing import ListedRun, MlflowRuns, list_runs
from .mirror import MlflowRunStore
from .upload import ArtifactUploader, adopt_remote, uploaded_steps

__all__ = [
    "TAG",
    "ArtifactUploader",
    "Index",
    "ListedRun",
    "MlflowRunStore",
    "MlflowRuns",
    "MlflowUnavailableError",
    "active_run_id",
    "adopt_remote",
    "import_mlflow",
    "list_runs",
    "mirror_dir",
    "parse_mlflow_uri",
    "staging_dir",
    "tracking_uri",
    "uploaded_steps",
]
