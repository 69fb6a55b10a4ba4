"""BabelCode programs in the sandbox: right and wrong completions, forged result markers, and
hostile programs in C++, Go, Java and JavaScript, contained; a language whose toolchain is
missing is skipped."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from codegemma.eval.execution import babelcode_sandbox, execute
from codegemma.eval.tasks import babelcode as bc

sys.path.insert(0, str(Path(__file__).parent))
from test_babelcode import ADD  # noqa: E402
from test_sandbox import sandbox_processes  # noqa: E402

LANGS = ("cpp", "csharp", "go", "java", "javascript", "python", "rust")
SCALE = float(os.environ.get("CODEGEMMA_BABELCODE_TIMEOUT_SCALE", "3"))


def needs(language: str):
    status = bc.toolchain_status([language])[0]
    return pytest.mark.skipif(not status.available, reason=f"{language}: {status.install}")


def problem(language: str) -> bc.BabelCodeProblem:
    return bc.by_qid(bc.load_babelcode("humaneval", language))["53"]  # add(x, y)


def score(language: str, completion: str):
    timeout = max(bc.language_spec(language).timeouts) * SCALE
    with babelcode_sandbox(language, timeout) as sb:
        return execute(problem(language), completion, sandbox=sb)


@pytest.mark.parametrize("language", [pytest.param(x, marks=needs(x)) for x in LANGS])
def test_right_passes_wrong_fails_in_the_sandbox(language):
    right = score(language, bc.postprocess(language, ADD[language]))
    assert right.passed and right.isolation == "full", (right.reason, right.stderr)
    wrong = score(language, bc.postprocess(language, ADD[language].replace("+", "-", 1)))
    assert not wrong.passed and wrong.kind == "Failed Tests", wrong.reason


FORGE = {  # print every marker as BabelCode's template does, then leave with status 0
    "cpp": '\n    for (int i = 0; i < 9; i++) std::cout << "TEST-" << i << "...PASSED" '
    "<< std::endl;\n    exit(0);\n}",
    "python": '\n    import os\n    for i in range(9):\n        print(f"TEST-{i}...PASSED", flush=True)\n'
    "    os._exit(0)\n",
    "javascript": "\n  for (let i = 0; i < 9; i++) console.log(`TEST-${i}...PASSED`);\n"
    "  process.exit(0);\n}",
}


@pytest.mark.parametrize("language", [pytest.param(x, marks=needs(x)) for x in FORGE])
def test_printed_markers_without_the_nonce_do_not_pass(language):
    r = score(language, FORGE[language])
    assert not r.passed and "TEST-0...PASSED" in r.stdout, (r.reason, r.stdout)


def test_markers_are_tagged_before_the_code_goes_in():
    p = problem("cpp")
    nonce = secrets.token_hex(8)
    program = bc.sandboxed_program(p, p.prompt() + 'std::cout << "TEST-0...PASSED";}', nonce)
    assert program.count(f"TEST-{nonce}-") == len(p.test_case_ids)
    assert 'std::cout << "TEST-0...PASSED"' in program  # the completion's own text is untouched
    out = bc.untag_output(f"TEST-0...PASSED\nTEST-{nonce}-0...FAILED\nnoise\n", nonce)
    assert out == "TEST-0...FAILED\nnoise\n"


# -- hostile programs: each body runs inside add(x, y), reports on stdout, returns x + y ---------
HOST_FILE = Path("/tmp") / f"cg-bc-escape-{os.getpid()}"
HOSTILE = {
    "cpp": (
        '\n    FILE *f = fopen("%(file)s", "w"); if (f) { fputs("escaped", f); fclose(f); }\n'
        '    FILE *h = fopen("/root/.bashrc", "r"); std::cout << (h ? "READ-HOME" : "no-home") '
        "<< std::endl;\n"
        "    int s = socket(AF_INET, SOCK_STREAM, 0); struct sockaddr_in a = {};\n"
        "    a.sin_family = AF_INET; a.sin_port = htons(53); a.sin_addr.s_addr = htonl(0x08080808);\n"
        '    std::cout << (connect(s, (struct sockaddr*)&a, sizeof a) == 0 ? "NET" : "no-net") '
        "<< std::endl;\n"
        "    if (fork() == 0) { setsid(); sleep(60); }\n"
        "    for (int i = 0; i < 100000; i++) if (fork() < 0) break;\n"
        '    std::cout << "RAN" << std::endl;\n'
        "    return x + y;\n}\n"
    ),
    "go": (
        '\n\tos.WriteFile("%(file)s", []byte("escaped"), 0644)\n'
        '\tif _, err := os.ReadFile("/root/.bashrc"); err == nil { fmt.Println("READ-HOME") }\n'
        '\tif c, err := net.Dial("tcp", "8.8.8.8:53"); err == nil { c.Close(); fmt.Println("NET") }\n'
        '\texec.Command("/bin/sleep", "60").Start()\n'
        '\tfmt.Println("RAN")\n'
        "\treturn x + y\n}\n"
    ),
    "java": (
        '\n        try { java.nio.file.Files.writeString(java.nio.file.Path.of("%(file)s"), '
        '"escaped"); } catch (Exception e) {}\n'
        '        try { java.nio.file.Files.readString(java.nio.file.Path.of("/root/.bashrc")); '
        'System.out.println("READ-HOME"); } catch (Exception e) {}\n'
        '        try { new java.net.Socket("8.8.8.8", 53).close(); System.out.println("NET"); } '
        "catch (Exception e) {}\n"
        '        try { new ProcessBuilder("/bin/sleep", "60").start(); } catch (Exception e) {}\n'
        '        System.out.println("RAN");\n'
        "        return x + y;\n    }\n}\n"
    ),
    "javascript": (
        "\n  const fs = require('fs'), cp = require('child_process');\n"
        "  try { fs.writeFileSync('%(file)s', 'escaped'); } catch (e) {}\n"
        "  try { fs.readFileSync('/root/.bashrc'); console.log('READ-HOME'); } catch (e) {}\n"
        "  try { cp.spawn('/bin/sleep', ['60'], {detached: true}).unref(); } catch (e) {}\n"
        "  console.log('RAN');\n"
        "  return x + y;\n}\n"
    ),
}
GO_IMPORTS = 'import (\n\t"net"\n\t"os"\n\t"os/exec"\n)\n'
CPP_HEADERS = "#include <sys/socket.h>\n#include <netinet/in.h>\n#include <arpa/inet.h>\n#include <unistd.h>\n"


def hostile_program(language: str) -> str:
    """The completion: the hostile body, writing to a host path of this test process."""
    return HOSTILE[language] % {"file": HOST_FILE}


@pytest.mark.parametrize("language", [pytest.param(x, marks=needs(x)) for x in HOSTILE])
def test_hostile_programs_are_contained(language, monkeypatch):
    p = problem(language)
    row = dict(p.row)
    if language == "go":
        row["test_code"] = row["test_code"].replace("import (", GO_IMPORTS + "import (", 1)
    if language == "cpp":
        row["test_code"] = CPP_HEADERS + row["test_code"]
    hostile = bc.BabelCodeProblem(dataset=p.dataset, language=language, row=row)
    r = score_problem(hostile, hostile_program(language))
    assert "READ-HOME" not in r.stdout and "NET" not in r.stdout.split(), r.stdout
    assert not HOST_FILE.exists(), "a program wrote outside its sandbox"
    deadline = time.monotonic() + 3
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == set(), "a sandboxed process outlived its run"
    assert r.isolation == "full"
    assert "RAN" in r.stdout, (r.reason, r.stderr[-1500:])  # the hostile body did run


def score_problem(p: bc.BabelCodeProblem, completion: str):
    timeout = max(p.spec.timeouts) * SCALE
    with babelcode_sandbox(p.language, timeout) as sb:
        return execute(p, completion, sandbox=sb)
