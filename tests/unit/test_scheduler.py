"""The server's bookkeeping, without a server: which job a worker takes, what a piece of work is
keyed by, which previews are shown, how a request is read, and what the render service says of
work before any of it is rendered."""

import time

import numpy as np
import pytest
import torch
from tensorboard import errors
from torch import nn
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import EnvironBuilder

import tb_microscope
from tb_microscope.execution import planner
from tb_microscope.execution.cache import RenderKey, ResultKey
from tb_microscope.optvis.engine import Quality
from tb_microscope.server.previews import atlas_qualities, render_preview
from tb_microscope.server.requests import (
    MAX_BODY_BYTES,
    UnavailableError,
    UnsupportedMediaTypeError,
    capped_arg,
    check_same_origin_json,
    check_same_site,
    int_arg,
    json_body,
)
from tb_microscope.server.service import Job, QueueFullError, RenderService, job_priority
from tb_microscope.server.work import Analysis, RenderWork

HOST = "http://localhost:6006"


def render_work(step=0, technique="channel", preview=False, **changes) -> RenderWork:
    fields = dict(run="/logs/exp1", run_id="id1", step=step, version="v1", node="conv2")
    fields.update(technique=technique, size=16, iterations=4, seed=0, preview=preview)
    return RenderWork(**{**fields, **changes})


def atlas(preview: bool) -> Analysis:
    options = (("grid", 20), ("preview", preview), ("step", 3))
    return Analysis("/logs/exp1", "id1", "atlas", "conv2", 0, options, ((3, "v3"),))


def job(work, touched: float, order: int) -> Job:
    queued = Job(work, order=order)
    queued.ask(0, touched)
    return queued


# --- which job a free worker takes ---------------------------------------------------------------


def test_a_preview_goes_before_full_work_asked_about_later():
    full = job(render_work(step=1), touched=10.0, order=0)
    preview = job(render_work(step=2, preview=True), touched=1.0, order=1)
    assert max([full, preview], key=job_priority) is preview


def test_an_atlas_preview_goes_before_a_full_render():
    full = job(render_work(), touched=10.0, order=0)
    first = job(atlas(preview=True), touched=1.0, order=1)
    assert max([full, first], key=job_priority) is first
    assert max([full, job(atlas(preview=False), 1.0, 2)], key=job_priority) is full


def test_the_work_asked_about_most_recently_goes_first():
    older, newer = job(render_work(step=1), 1.0, 0), job(render_work(step=2), 2.0, 1)
    assert max([older, newer], key=job_priority) is newer


def test_of_work_asked_about_at_the_same_moment_the_first_queued_goes_first():
    first, second = job(render_work(step=1), 5.0, 0), job(render_work(step=2), 5.0, 1)
    assert max([second, first], key=job_priority) is first


def test_asking_about_a_unit_again_moves_its_job_up_but_never_back():
    queued = job(render_work(), touched=5.0, order=0)
    queued.ask(1, 7.0)
    queued.ask(0, 6.0)  # a late answer of an earlier poll
    assert queued.touched == 7.0
    assert queued.asked == {0: 6.0, 1: 7.0}


# --- what a piece of work is keyed by -------------------------------------------------------------


def test_render_work_carries_its_settings_to_the_planner():
    work = render_work(technique="diversity", size=32, iterations=8, seed=3, bands=(2, 1, 0))
    assert work.settings == planner.Settings("diversity", 32, 8, 3, (2, 1, 0))
    assert work.snapshots == ((0, "v1"),)


def test_render_work_keys_every_image_of_a_unit():
    work = render_work(technique="diversity")
    keys = work.keys(5)
    assert keys == [
        RenderKey(0, "v1", "conv2", 5, "diversity", 16, 4, 0, image, None) for image in range(4)
    ]
    assert work.key(5, 2) == keys[2]
    assert work.key(5) == keys[0]
    assert render_work().keys(5) == [RenderKey(0, "v1", "conv2", 5, "channel", 16, 4, 0, 0)]


def test_a_preview_and_a_full_render_never_share_a_key():
    full, preview = render_work(), render_work(preview=True, size=8, iterations=2)
    assert full.key(0) != preview.key(0)
    assert full != preview


def test_an_analysis_is_keyed_by_its_kind_unit_options_and_snapshots():
    work = atlas(preview=False)
    assert work.result_key == ResultKey(
        "atlas", "conv2", 0, (("grid", 20), ("preview", False), ("step", 3)), ((3, "v3"),)
    )
    assert work.option("grid") == 20
    assert work.option("size") is None
    assert not work.preview and atlas(preview=True).preview
    assert atlas(preview=True).result_key != work.result_key


def test_an_analysis_without_a_preview_option_is_full_work():
    work = Analysis("/logs/exp1", "id1", "history", "conv2", 4, (), ((0, "a"), (1, "b")))
    assert not work.preview
    assert work.result_key.snapshots == ((0, "a"), (1, "b"))


# --- which previews are shown ---------------------------------------------------------------------


def test_a_units_preview_is_what_the_flags_ask_within_the_full_render():
    assert render_preview(Quality(128, 512), Quality(32, 24)) == Quality(32, 24)
    assert render_preview(Quality(24, 512), Quality(32, 24)) == Quality(24, 24)


@pytest.mark.parametrize(
    "asked", [Quality(0, 24), Quality(32, 0), Quality(-1, 24), Quality(128, 512), Quality(200, 600)]
)
def test_no_preview_when_it_is_turned_off_or_would_cost_as_much_as_the_render(asked):
    assert render_preview(Quality(128, 512), asked) is None


def test_an_atlas_is_never_larger_or_longer_than_a_units_render():
    assert atlas_qualities(Quality(128, 512)) == {
        "full": Quality(64, 128),
        "preview": Quality(32, 24),
    }
    assert atlas_qualities(Quality(48, 64)) == {"full": Quality(48, 64), "preview": Quality(32, 24)}
    assert atlas_qualities(Quality(24, 8)) == {"full": Quality(24, 8), "preview": None}


# --- how a request is read ------------------------------------------------------------------------


def test_whole_numbers_are_read_from_a_query_or_a_body():
    assert int_arg({"unit": "12"}, "unit") == 12
    assert int_arg({"unit": 12}, "unit") == 12
    assert int_arg({}, "count", 8, 1, 64) == 8
    assert int_arg({"count": "64"}, "count", 8, 1, 64) == 64


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "missing query parameter 'unit'"),
        ({"unit": "x"}, "unit must be a whole number, got 'x'"),
        ({"unit": "1.5"}, "unit must be a whole number, got '1.5'"),
        ({"unit": 1.0}, "unit must be a whole number, got 1.0"),
        ({"unit": True}, "unit must be a whole number, got True"),
        ({"unit": [1]}, r"unit must be a whole number, got \[1\]"),
        ({"unit": "-1"}, "unit must be from 0 to 4611686018427387904, got -1"),
        ({"unit": str(2**62 + 1)}, "unit must be from 0 to 4611686018427387904, got"),
    ],
)
def test_a_bad_whole_number_is_a_400_saying_what_was_wrong(args, message):
    with pytest.raises(errors.InvalidArgumentError, match=message):
        int_arg(args, "unit")


def test_a_number_outside_the_routes_range_is_refused():
    with pytest.raises(errors.InvalidArgumentError, match="count must be from 1 to 64, got 65"):
        int_arg({"count": "65"}, "count", 8, 1, 64)


def post(data=b"{}", content_type="application/json", method="POST", headers=None):
    return EnvironBuilder(
        path="/data/plugin/tb_microscope/render",
        method=method,
        base_url=HOST,
        content_type=content_type,
        data=data,
        headers=headers or {},
    ).get_request()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": HOST},
        {"Origin": "HTTP://LOCALHOST:6006"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
    ],
)
def test_a_json_post_from_the_tabs_own_origin_is_taken(headers):
    check_same_origin_json(post(headers=headers))


def test_a_post_from_another_site_may_not_start_work():
    with pytest.raises(errors.PermissionDeniedError, match="from https://evil.example may not"):
        check_same_origin_json(post(headers={"Origin": "https://evil.example"}))
    with pytest.raises(errors.PermissionDeniedError, match="from http://localhost:6007 may not"):
        check_same_origin_json(post(headers={"Origin": "http://localhost:6007"}))
    with pytest.raises(errors.PermissionDeniedError, match="a cross-site request may not"):
        check_same_origin_json(post(headers={"Sec-Fetch-Site": "cross-site"}))


def test_a_form_post_or_a_get_is_refused():
    with pytest.raises(UnsupportedMediaTypeError, match="not text/plain") as refused:
        check_same_origin_json(post(content_type="text/plain"))
    assert refused.value.http_code == 415
    with pytest.raises(errors.InvalidArgumentError, match="takes a POST with a JSON body"):
        check_same_origin_json(post(method="GET"))


def test_a_json_body_is_read_as_an_object():
    assert json_body(post(b'{"units": [1, 2], "step": 3}')) == {"units": [1, 2], "step": 3}
    assert json_body(post(b"")) == {}


@pytest.mark.parametrize(
    "data, message",
    [(b"[1, 2]", "the body must be a JSON object"), (b"{units", "the body is not JSON")],
)
def test_a_body_that_is_not_a_json_object_is_a_400(data, message):
    with pytest.raises(errors.InvalidArgumentError, match=message):
        json_body(post(data))


def test_a_body_over_the_limit_is_a_413():
    with pytest.raises(RequestEntityTooLarge):
        json_body(post(b" " * (MAX_BODY_BYTES + 1)))
    assert json_body(post(b"{}" + b" " * (MAX_BODY_BYTES - 2))) == {}


def test_a_full_queue_asks_the_tab_to_come_back():
    full = UnavailableError("the render queue is full")
    assert full.http_code == 503
    assert ("Retry-After", "2") in full.headers


# --- the render service before anything is rendered -----------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run of a three-layer model with one snapshot (a couple of seconds to log)."""
    path = tmp_path_factory.mktemp("runs") / "exp1"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with tb_microscope.Logger(path, model, torch.rand(1, 3, 16, 16), steps=[0]) as logger:
        logger.log(0)
    return str(path)


def service_work(service, run_dir, run_id=None, **changes) -> RenderWork:
    run = service.run(run_dir)
    return render_work(
        run=run_dir, run_id=run_id or run.id, version=run.snapshot_version(0), node="0", **changes
    )


def wait(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_units_in_the_cache_are_done_without_queuing_anything(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), max_queued=0)
    work = service_work(service, run_dir)
    assert service.missing(work, [0, 1, 2]) == [0, 1, 2]
    image = np.zeros((16, 16, 3), np.uint8)
    service.cache(service.run(run_dir)).put(work.key(1), image, 0.0, 0.0)
    assert service.missing(work, [0, 1, 2]) == [0, 2]
    assert service.request(work, [1]) == {1: {"status": "done"}}
    assert service.snapshot()["queued"] == 0


def test_an_atlas_is_done_only_once_its_picture_is_there_too(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), max_queued=0)
    run = service.run(run_dir)
    work = Analysis(run_dir, run.id, "atlas", "0", 0, (("step", 0),), ((0, "v"),))
    cache = service.cache(run)
    cache.put_result(work.result_key, {"cells": []})
    assert service.missing(work, [0]) == [0]  # the picture may be evicted on its own
    cache.put_picture(work.result_key, np.zeros((4, 4, 4), np.uint8))
    assert service.missing(work, [0]) == []
    history = Analysis(run_dir, run.id, "history", "0", 1, (), ((0, "v"),))
    cache.put_result(history.result_key, {"unit": 1, "history": []})
    assert service.missing(history, [1]) == []


def test_a_full_queue_refuses_more_work(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), max_queued=0)
    with pytest.raises(QueueFullError, match=r"the render queue is full \(0 waiting\)"):
        service.request(service_work(service, run_dir), [0])


def test_new_work_is_queued_first_in_line(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path))
    work = service_work(service, run_dir, run_id="an older run of the same name")
    status = {"status": "queued", "position": 0, "progress": 0.0, "units": 3}
    assert service.request(work, [0, 1, 2]) == {unit: status for unit in (0, 1, 2)}
    wait(service.idle)  # the worker finds the run changed under it: nothing is rendered


def test_work_for_a_run_logged_again_fails_and_the_failure_is_kept_for_the_pollers(
    run_dir, tmp_path
):
    service = RenderService(device="cpu", cache_dir=str(tmp_path))
    work = service_work(service, run_dir, run_id="an older run of the same name")
    service.request(work, [0, 1])
    wait(service.idle)
    failed = {
        "status": "failed",
        "error": "RunChangedError: run 'exp1' was logged again while this waited; ask again",
    }
    assert service.request(work, [0, 1]) == {0: failed, 1: failed}
    assert service.idle()  # not queued again before retry_after
    snapshot = service.snapshot()
    assert (snapshot["failed"], snapshot["renders"], snapshot["units_rendered"]) == (1, 0, 0)
    assert service.cancel(work, [0, 1]) == 0  # nothing waits for it any more


def test_after_retry_after_a_failed_unit_is_tried_again(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), retry_after=0)
    work = service_work(service, run_dir, run_id="an older run of the same name")
    service.request(work, [0])
    wait(service.idle)
    assert service.request(work, [0])[0]["status"] == "queued"
    wait(lambda: service.idle() and service.stats["failed"] == 2)


def test_the_status_route_says_what_the_service_holds(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), cache_bytes=1 << 20)
    snapshot = service.snapshot()
    assert snapshot["devices"] == ["cpu"] and snapshot["ray"] is None
    assert (snapshot["queued"], snapshot["running"]) == (0, 0)
    assert snapshot["cache_bytes"] == 0
    counts = ("renders", "units_rendered", "analyses", "failed", "dropped", "cancelled")
    assert all(snapshot[name] == 0 for name in counts)
    assert service.cancel(service_work(service, run_dir), [0, 1]) == 0  # never asked for


def test_queued_work_waits_its_turn_and_cancel_forgets_it(run_dir, tmp_path):
    """One worker, busy with a render that would take hours: what is asked meanwhile waits in
    line, newest first, and `cancel` drops it from the line or stops it while it runs."""
    service = RenderService(device="cpu", cache_dir=str(tmp_path), abandon_after=60)
    busy = service_work(service, run_dir, iterations=100_000)
    service.request(busy, [0])
    wait(lambda: service.request(busy, [0])[0]["status"] == "running")
    older, newer = (service_work(service, run_dir, seed=seed) for seed in (1, 2))
    assert service.request(older, [0, 1])[0]["position"] == 1
    assert service.request(newer, [0])[0]["position"] == 1  # asked about last: next in line
    assert service.request(older, [1])[1]["position"] == 1  # asked about again: next again
    assert service.snapshot()["queued"] == 2
    assert service.cancel(older, [0, 1, 2]) == 2
    assert service.cancel(newer, [0]) == 1
    assert service.snapshot()["queued"] == 0
    assert service.cancel(busy, [0]) == 1  # nobody else waits for it: it stops
    wait(service.idle)
    assert service.stats["cancelled"] == 1 and service.stats["renders"] == 0


def get(headers=None):
    return EnvironBuilder(
        path="/image", base_url="http://localhost:6006", headers=headers or {}
    ).get_request()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": HOST}],
)
def test_a_get_from_the_tab_or_the_address_bar_may_start_work(headers):
    check_same_site(get(headers))


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_get_another_sites_page_could_send_may_not_start_work(headers):
    with pytest.raises(errors.PermissionDeniedError, match="may not start or stop work"):
        check_same_site(get(headers))


def test_a_capped_argument_names_the_flag_that_allows_more():
    assert capped_arg({}, "size", 64, (8, 1024), 128, "--microscope_max_size") == 64
    assert capped_arg({"size": "128"}, "size", 64, (8, 1024), 128, "--microscope_max_size") == 128
    with pytest.raises(errors.InvalidArgumentError, match="at most 128.*--microscope_max_size"):
        capped_arg({"size": "129"}, "size", 64, (8, 1024), 128, "--microscope_max_size")
    with pytest.raises(errors.InvalidArgumentError, match="from 8 to 1024"):
        capped_arg({"size": "2000"}, "size", 64, (8, 1024), 4096, "--microscope_max_size")
