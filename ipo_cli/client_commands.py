"""``ipo files ...`` and ``ipo jobs ...``: the public API from the terminal (``--json`` for scripts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app.schemas.job_spec import SCHEMA_PATH, SPEC_VERSION
from ipo_cli.downloads import download_adapter, download_checkpoint
from ipo_cli.errors import CliError
from ipo_cli.http import ApiClient
from ipo_cli.local import configured_models_dir
from ipo_cli.watch import watch_job

BaseUrl = Annotated[str | None, typer.Option("--base-url", envvar="IPO_BASE_URL", help="API base URL.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="IPO_API_KEY", help="API key.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

files = typer.Typer(help="Upload and inspect files.", no_args_is_help=True)
jobs = typer.Typer(help="Create and follow fine-tuning jobs.", no_args_is_help=True)


def _print(obj: Any, as_json: bool, line: str) -> None:
    typer.echo(json.dumps(obj, indent=None if as_json else 2) if as_json else line)


@files.command("upload")
def files_upload(path: Path, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    obj = ApiClient(base_url, api_key).upload(path)
    _print(
        obj,
        as_json,
        f"{obj['id']}  {obj['filename']}  {obj['bytes']} bytes  {obj['status']}"
        + (f"\n{obj['status_details']}" if obj.get("status_details") else ""),
    )


@files.command("get")
def files_get(file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    obj = ApiClient(base_url, api_key).json("GET", f"/v1/files/{file_id}")
    _print(obj, as_json, f"{obj['id']}  {obj['filename']}  {obj['bytes']} bytes  {obj['status']}")


@files.command("list")
def files_list(limit: int = 100, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    obj = ApiClient(base_url, api_key).json("GET", "/v1/files", params={"limit": limit})
    _print(
        obj, as_json, "\n".join(f"{f['id']}  {f['filename']}  {f['bytes']} bytes  {f['status']}" for f in obj["data"])
    )


@files.command("download")
def files_download(
    file_id: str,
    out: Annotated[Path | None, typer.Option(help="Where to write it (default: ./<its filename>).")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Download a file's content (an uploaded file, a job's metrics CSV or samples, an adapter archive)."""
    client = ApiClient(base_url, api_key)
    obj = client.json("GET", f"/v1/files/{file_id}")
    dest = client.download(file_id, out or Path(Path(str(obj["filename"])).name))
    _print({**obj, "path": str(dest)}, as_json, f"{dest}  {dest.stat().st_size} bytes")


@files.command("delete")
def files_delete(file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    obj = ApiClient(base_url, api_key).json("DELETE", f"/v1/files/{file_id}")
    _print(obj, as_json, f"{obj['id']}  deleted")


@jobs.command("create")
def jobs_create(
    training_file: Annotated[
        str | None, typer.Option(help="File id (file-...) or a local JSONL path to upload; or from --spec.")
    ] = None,
    model: Annotated[str, typer.Option()] = "tiny-mistral",
    validation_file: Annotated[str | None, typer.Option()] = None,
    method: Annotated[str, typer.Option(help="ipo, dpo or supervised")] = "ipo",
    beta: Annotated[float | None, typer.Option(help="IPO tau / DPO beta")] = None,
    n_epochs: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    suffix: Annotated[str | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    spec: Annotated[
        Path | None, typer.Option(help="A JSON/YAML job spec (`ipo jobs spec` writes one); flags override it.")
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    client = ApiClient(base_url, api_key)
    body: dict[str, Any] = _load_spec(spec) if spec else {}
    body["model"] = body.get("model", model)
    training_file = training_file or body.get("training_file")
    if not training_file:
        raise CliError("give --training-file, or a --spec that names training_file")
    body["training_file"] = _file_id(client, str(training_file))
    validation_file = validation_file or body.get("validation_file")
    if validation_file:
        body["validation_file"] = _file_id(client, str(validation_file))
    hp = {
        k: v for k, v in {"beta": beta, "n_epochs": n_epochs, "learning_rate": learning_rate}.items() if v is not None
    }
    body.setdefault("method", {"type": method})
    if hp:
        block = body["method"].setdefault(body["method"]["type"], {})
        block.setdefault("hyperparameters", {}).update(hp)
    for key, value in (("suffix", suffix), ("seed", seed)):
        if value is not None:
            body[key] = value
    obj = client.json("POST", "/v1/fine_tuning/jobs", json=body)
    _print(obj, as_json, f"{obj['id']}  {obj['status']}")


def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise CliError(f"no such spec file: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid JSON/YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise CliError(f"{path}: a job spec must be a mapping")
    version = loaded.pop("spec_version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise CliError(f"{path}: spec_version {version!r} is not supported (this ipo reads {SPEC_VERSION})")
    return loaded


def _file_id(client: ApiClient, ref: str) -> str:
    if ref.startswith("file-"):
        return ref
    obj = client.upload(Path(ref))
    if obj["status"] == "error":
        raise CliError(f"{ref}: {obj['status_details']}")
    return str(obj["id"])


@jobs.command("get")
def jobs_get(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    obj = ApiClient(base_url, api_key).json("GET", f"/v1/fine_tuning/jobs/{job_id}")
    _print(
        obj,
        as_json,
        f"{obj['id']}  {obj['status']}  step {obj.get('step')}/{obj.get('total_steps')}"
        + (f"  error: {obj['error']['message']}" if obj.get("error") else "")
        + _lineage_text(obj.get("lineage") or {}),
    )


def _lineage_text(lineage: dict[str, Any]) -> str:
    """``  from ftjob-... (checkpoint ftckpt-...) on tiny-mistral`` for a job that started from a fine-tuned
    model or checkpoint; empty for a job on a base model."""
    if not lineage.get("parent_job_id"):
        return ""
    ckpt = f" (checkpoint {lineage['parent_checkpoint_id']})" if lineage.get("parent_checkpoint_id") else ""
    return f"  from {lineage['parent_job_id']}{ckpt} on {lineage.get('base_model')}"


@jobs.command("spec")
def jobs_spec(
    job_id: str,
    out: Annotated[Path | None, typer.Option(help="Write here (.json: JSON, else YAML); default: stdout.")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Write a job back as a spec file; `ipo jobs create --spec FILE` replays it."""
    import yaml

    client = ApiClient(base_url, api_key)
    spec = client.json("GET", f"/v1/fine_tuning/jobs/{job_id}/spec")
    if out is not None and out.suffix == ".json":
        text = json.dumps(spec, indent=2) + "\n"
    else:
        header = (
            f"# ipo-align job spec v{spec.get('spec_version')} of {job_id}; schema: {client.base_url}{SCHEMA_PATH}\n"
            "# replay: ipo jobs create --spec THIS_FILE (flags override it)\n"
        )
        text = header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


@jobs.command("list")
def jobs_list(limit: int = 20, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    obj = ApiClient(base_url, api_key).json("GET", "/v1/fine_tuning/jobs", params={"limit": limit})
    _print(obj, as_json, "\n".join(f"{j['id']}  {j['status']:<10} {j['model']}" for j in obj["data"]))


def _transition(job_id: str, action: str, base_url: str | None, api_key: str | None, as_json: bool) -> None:
    obj = ApiClient(base_url, api_key).json("POST", f"/v1/fine_tuning/jobs/{job_id}/{action}")
    _print(obj, as_json, f"{obj['id']}  {obj['status']}")


@jobs.command("cancel")
def jobs_cancel(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Cancel a job."""
    _transition(job_id, "cancel", base_url, api_key, as_json)


@jobs.command("pause")
def jobs_pause(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Pause a job."""
    _transition(job_id, "pause", base_url, api_key, as_json)


@jobs.command("resume")
def jobs_resume(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Resume a job."""
    _transition(job_id, "resume", base_url, api_key, as_json)


@jobs.command("events")
def jobs_events(
    job_id: str,
    limit: Annotated[int, typer.Option(help="The newest N events (1-100, the API's page size).")] = 50,
    all_events: Annotated[bool, typer.Option("--all", help="Every event, page by page (ignores --limit).")] = False,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """The job's events, oldest first (the newest ``--limit``, or ``--all``)."""
    client = ApiClient(base_url, api_key)
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    obj = client.json("GET", path, params={"limit": 100 if all_events else limit})
    events = list(obj["data"])
    while all_events and obj.get("has_more") and events:  # newest first: page on from the oldest seen
        obj = client.json("GET", path, params={"limit": 100, "after": events[-1]["id"]})
        events += obj["data"]
    _print(
        {**obj, "data": events, "has_more": False if all_events else obj.get("has_more")},
        as_json,
        "\n".join(f"{e['id']}  {e['level']:<5} {e['message']}" for e in reversed(events)),
    )


def sample_events(client: ApiClient, job_id: str) -> list[dict[str, Any]]:
    """Every ``samples`` event of a job (``data.samples``, see worker/training/samples.py), oldest first,
    read page by page from ``GET /v1/fine_tuning/jobs/{id}/events``."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100} | ({"after": after} if after else {})
        page = client.json("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        found += [e for e in page["data"] if isinstance(e.get("data"), dict) and "samples" in e["data"]]
        if not page.get("has_more") or not page["data"]:
            return found[::-1]
        after = page["data"][-1]["id"]


@jobs.command("samples")
def jobs_samples(
    job_id: str,
    step: Annotated[int | None, typer.Option(help="The evaluation step (default: the latest one sampled).")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Replies of the reference (base) and the policy (base + adapter) to the sampled prompts at one step,
    with the log-probability of the chosen and the rejected reply under each. Texts are cut to 300
    characters; the job's samples.jsonl result file has them whole."""
    events = sample_events(ApiClient(base_url, api_key), job_id)
    if not events:
        raise CliError(f"{job_id} has no samples yet (they are taken at each evaluation and at the end)")
    steps = [e["data"]["step"] for e in events]
    if step is None:
        step = steps[-1]
    chosen = [e for e in events if e["data"]["step"] == step]
    if not chosen:
        raise CliError(f"no samples at step {step}; steps sampled: {', '.join(map(str, sorted(set(steps))))}")
    data = chosen[-1]["data"]  # a resumed attempt may sample a step again: the latest wins
    if as_json:
        typer.echo(json.dumps(data))
        return
    typer.echo(f"step {data['step']}: {len(data['samples'])} prompts from the {data.get('source', '?')}")
    for i, s in enumerate(data["samples"], 1):
        typer.echo(f"\n[{i}] prompt:    {s['prompt']}")
        typer.echo(f"    chosen:    {s['chosen']}")
        typer.echo(f"    rejected:  {s['rejected']}")
        typer.echo(f"    reference: {s['reference_reply']}")
        typer.echo(f"    policy:    {s['policy_reply']}")
        typer.echo(
            f"    log p(chosen) {s['reference_logp_chosen']:.2f} -> {s['policy_logp_chosen']:.2f}, "
            f"log p(rejected) {s['reference_logp_rejected']:.2f} -> {s['policy_logp_rejected']:.2f} "
            "(reference -> policy)"
        )
        if s.get("scores"):
            shown = (f"{k}={v:.2f}" if isinstance(v, int | float) else f"{k}=null" for k, v in s["scores"].items())
            typer.echo("    scores:    " + ", ".join(shown))
            for k, reason in (s.get("score_reasons") or {}).items():
                typer.echo(f"      {k}: {reason}")


@jobs.command("watch")
def jobs_watch(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Live progress until the job ends; exit 0 when it succeeded, 1 otherwise."""
    status = watch_job(ApiClient(base_url, api_key), job_id)
    raise typer.Exit(0 if status == "succeeded" else 1)


@jobs.command("download")
def jobs_download(
    job_id: str,
    out: Annotated[Path, typer.Option(help="Directory for the adapter.")] = Path("adapter"),
    checkpoint: Annotated[
        str | None, typer.Option(help="A checkpoint id (ftckpt-...) or step number instead of the final adapter.")
    ] = None,
    merged: Annotated[
        bool, typer.Option(help="Also write base + adapter merged into a standalone model (needs the worker extra).")
    ] = False,
    base: Annotated[
        Path | None, typer.Option(help="With --merged: the base model directory (default: IPO_MODELS_DIR/<model>).")
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download and unpack the job's adapter (adapter_model.safetensors, adapter_config.json, tokenizer)."""
    client = ApiClient(base_url, api_key)
    if checkpoint is None:
        adapter_dir = download_adapter(client, job_id, out)
    else:
        adapter_dir = download_checkpoint(client, job_id, checkpoint, out)
    typer.echo(f"adapter in {adapter_dir}")
    if merged:
        job = client.json("GET", f"/v1/fine_tuning/jobs/{job_id}")
        merged_dir = out.with_name(out.name + "-merged")
        root = (job.get("lineage") or {}).get("base_model") or job["model"]
        parents = download_lineage(client, job, out.with_name(out.name + "-parents"))
        merge_into(base or configured_models_dir() / root, adapter_dir, merged_dir, parents)
        chain = f" (base + {len(parents)} earlier adapter(s) + this one)" if parents else ""
        typer.echo(f"merged model in {merged_dir}{chain} (loads with AutoModelForCausalLM.from_pretrained)")


def download_lineage(client: ApiClient, job: dict[str, Any], out: Path) -> list[Path]:
    """The adapters a job started from (its ``lineage``), downloaded root first: each parent's final adapter,
    or the checkpoint it started from. Empty for a job on a base model."""
    chain: list[Path] = []
    lineage = job.get("lineage") or {}
    while lineage.get("parent_job_id"):
        parent_id, ckpt = lineage["parent_job_id"], lineage.get("parent_checkpoint_id")
        where = out / str(len(chain))
        chain.append(
            download_checkpoint(client, parent_id, ckpt, where) if ckpt else download_adapter(client, parent_id, where)
        )
        lineage = client.json("GET", f"/v1/fine_tuning/jobs/{parent_id}").get("lineage") or {}
    return chain[::-1]


def merge_into(base: Path, adapter: Path, out: Path, parents: list[Path] | None = None) -> None:
    try:
        from worker.training.merge import MergeError, merge_adapter
    except ImportError as exc:  # the API-only install has no torch
        raise CliError(f"--merged needs the worker extra (pip install 'ipo-align[worker]'): {exc}") from exc
    if not (base / "config.json").is_file():
        raise CliError(f"base model not found at {base}; pass --base DIR")
    try:
        merge_adapter(base, adapter, out, parents=parents)
    except MergeError as exc:
        raise CliError(str(exc)) from exc


def demo_command(
    model: Annotated[
        str | None,
        typer.Option(
            help="tiny-mistral (default: the tiny model, built locally) or smollm2-135m-instruct (a real model, "
            "fetched with ipo models fetch; trains replies that open with 'Answer:')."
        ),
    ] = None,
) -> None:
    """Run the demo end to end: build or fetch the model, start, train, measure before and after, stop."""
    from ipo_cli.demo import run_demo

    raise typer.Exit(run_demo(model))


__all__ = ["demo_command", "files", "jobs"]
