import json

import pytest

from effedu.general.sweeps import sweep_main


def test_sweep_main_parses_the_shared_options_and_writes_the_json(tmp_path, capsys):
    seen = {}

    def run(args):
        seen.update(quick=args.quick, threads=args.threads, extra=args.extra)
        return {"x": [1, 2], "seconds": 1.4}

    out = tmp_path / "sub" / "r.json"
    res = sweep_main(["--quick", "--threads", "1", "--out", str(out), "--extra", "7"], command="c", description="d\nmore",
                     default_out=tmp_path / "default.json", run=run,
                     add_arguments=lambda p: p.add_argument("--extra", type=int))
    assert res == {"x": [1, 2], "seconds": 1.4} and seen == {"quick": True, "threads": 1, "extra": 7}
    assert json.loads(out.read_text()) == res and out.read_text() == '{"x":[1,2],"seconds":1.4}\n'
    assert f"wrote {out} (1 s)" in capsys.readouterr().out
    sweep_main([], command="c", description="d", default_out=tmp_path / "default.json", run=lambda a: {"q": a.quick},
               threads=False, indent=1)
    assert json.loads((tmp_path / "default.json").read_text()) == {"q": False}
    with pytest.raises(SystemExit):  # --threads is not an option of a sweep that does not take it
        sweep_main(["--threads", "2"], command="c", description="d", default_out=out, run=lambda a: {}, threads=False)
    with pytest.raises(TypeError, match="run must return the results dict"):
        sweep_main([], command="c", description="d", default_out=out, run=lambda a: None)


def test_torch_threads_scopes_the_thread_count():
    import torch

    from effedu.general.sweeps import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None: unchanged
        assert torch.get_num_threads() == before
