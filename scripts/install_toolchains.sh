#!/usr/bin/env bash
# Install the compilers and runtimes BabelCode's eight languages need (Debian/Ubuntu, as root):
# g++, Mono's C# compiler with System.Web and System.Web.Extensions, Go, a JDK 17, Node.js,
# the Kotlin 1.7.22 compiler (npm package kotlin-compiler on that JDK), `python`, rustc.
# Idempotent: a language whose executables are already on PATH is skipped, and apt-get update
# runs at most once, only when something is missing.
#
#   sudo scripts/install_toolchains.sh            # every language
#   sudo scripts/install_toolchains.sh go kotlin  # some
#
# Keep in step with INSTALL in src/codegemma/eval/tasks/babelcode.py.
set -euo pipefail

ALL=(cpp csharp go java javascript kotlin python rust)
LANGS=("$@")
[[ ${#LANGS[@]} -eq 0 ]] && LANGS=("${ALL[@]}")
for lang in "${LANGS[@]}"; do
  if [[ " ${ALL[*]} " != *" $lang "* ]]; then
    echo "unknown language: $lang (choose from ${ALL[*]})" >&2
    exit 2
  fi
done

tools_of() {
  case "$1" in
    cpp) echo "g++" ;;
    csharp) echo "mono-csc mono" ;;
    go) echo "go" ;;
    java) echo "java" ;;
    javascript) echo "node" ;;
    kotlin) echo "kotlinc java" ;;
    python) echo "python" ;;
    rust) echo "rustc" ;;
  esac
}

packages_of() {
  case "$1" in
    cpp) echo "g++" ;;
    csharp) echo "mono-mcs mono-devel libmono-system-web-extensions4.0-cil" ;;
    go) echo "golang-go" ;;
    java) echo "openjdk-17-jdk-headless" ;;
    javascript) echo "nodejs" ;;
    kotlin) echo "openjdk-17-jdk-headless npm" ;;
    python) echo "python-is-python3" ;;
    rust) echo "rustc" ;;
  esac
}

missing() {
  local tool
  for tool in $(tools_of "$1"); do
    command -v "$tool" >/dev/null 2>&1 || return 0
  done
  # C# also needs the System.Web assemblies the test programs reference.
  if [[ "$1" == csharp ]] && ! ls /usr/lib/mono/4.5/System.Web.Extensions.dll >/dev/null 2>&1; then
    return 0
  fi
  return 1
}

if [[ $(id -u) -ne 0 ]]; then
  echo "run as root (apt-get and npm -g install system-wide)" >&2
  exit 1
fi

UPDATED=0
apt_install() {
  if [[ $UPDATED -eq 0 ]]; then
    apt-get update
    UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

for lang in "${LANGS[@]}"; do
  if ! missing "$lang"; then
    echo "$lang: present ($(tools_of "$lang"))"
    continue
  fi
  echo "$lang: installing"
  if [[ "$lang" == kotlin ]]; then
    command -v java >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 ||
      apt_install $(packages_of kotlin)
    if ! command -v kotlinc >/dev/null 2>&1; then
      npm install -g kotlin-compiler@1.7.22
      # The package's bin map names only kotlinc-js; the JVM compiler is bin/kotlinc inside it.
      ln -sf "$(npm root -g)/kotlin-compiler/bin/kotlinc" /usr/local/bin/kotlinc
    fi
  else
    # shellcheck disable=SC2046  # word splitting of the package list is intended
    apt_install $(packages_of "$lang")
  fi
done

for lang in "${LANGS[@]}"; do
  if missing "$lang"; then
    echo "$lang: still missing $(tools_of "$lang")" >&2
    exit 1
  fi
done
echo "toolchains ready: ${LANGS[*]}"
