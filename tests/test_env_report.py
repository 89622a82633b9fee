"""effedu.env_report() and effedu.cpu_description(): the setup cell and benchmark headers name the CPU and its ISA."""
import effedu

CPU_KEYS = ("cpu", "cpu isa (torch)", "cpu (numba/llvm)", "numba svml")


def test_env_report_names_the_cpu_and_its_vector_isa(capsys):
    report = effedu.env_report()
    for key in CPU_KEYS:
        assert key in report, key
    assert isinstance(report["cpu"], str) and report["cpu"].strip()
    assert report["numba svml"] in (True, False, None)
    printed = capsys.readouterr().out
    assert f"{'cpu'.ljust(max(map(len, report)))} : {report['cpu']}" in printed
    quiet = effedu.env_report(print_report=False)
    assert capsys.readouterr().out == ""  # print_report=False prints nothing
    assert {k: quiet[k] for k in CPU_KEYS} == {k: report[k] for k in CPU_KEYS}


def test_cpu_description_is_one_line_with_model_and_isa():
    line = effedu.cpu_description()
    assert isinstance(line, str) and line.strip() and "\n" not in line
    facts = effedu.env_report(print_report=False)
    assert line.startswith(facts["cpu"])
    if facts["cpu isa (torch)"]:
        assert facts["cpu isa (torch)"] in line
    if facts["cpu (numba/llvm)"]:
        assert f"llvm {facts['cpu (numba/llvm)']}" in line
    assert "cpu_description" in effedu.__all__
