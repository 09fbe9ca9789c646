#!/usr/bin/env bash
# Installs CRIU 4.2.x from Debian's "forky" suite into a private root folder, without touching the
# system's own libraries (CRIU 4.2 needs glibc >= 2.38, Debian 12 has 2.36; Debian 12's own criu
# 3.17 does not start on kernel 6.18 and 4.1 cannot dump AF_INET sockets on >= 6.16, see
# docs/measured.md):
#
#   1. a private apt configuration (own sources list naming only "forky main", own lists, cache,
#      state and dpkg status; the system's sources, lists and preferences are not used or changed),
#   2. `apt-get download` of criu, the shared libraries it needs (its Depends closure in forky plus
#      a fixed list measured to be enough) and python3-pycriu,
#   3. `dpkg -x` of each into CRIU_ROOT (default /opt/llmuxd/criu; never under /tmp, a fresh
#      container has a fresh /tmp),
#   4. a wrapper CRIU_WRAPPER (default /usr/local/bin/criu) running CRIU with its own loader:
#        ROOT/usr/lib/<triplet>/ld-linux-*.so.* --library-path ROOT/usr/lib/<triplet> ROOT/usr/sbin/criu "$@"
#   5. optionally, a Python venv (VENV; default ../.venv next to this script when it exists)
#      that can `import pycriu`: a .pth file naming ROOT/usr/lib/python3/dist-packages, and
#      `pip install "protobuf>=3.20,<7"` (protobuf 7 breaks pycriu),
#   6. checks: `criu --version` is 4.2.x, every library resolves inside ROOT, `criu check`, and
#      (after a fresh install or with --self-test) a real dump / decode / restore of `sleep`.
#
# Idempotent: a second run finds the stamp file in ROOT and only re-checks (well under a second).
# Used as is by the Dockerfile and by tests/infra/build-image.sh (in a chroot: --no-check).
#
# Usage: install-criu.sh [--root DIR] [--wrapper PATH|none] [--venv DIR|none] [--suite SUITE]
#                        [--mirror URL] [--no-check] [--self-test|--no-self-test] [--force]
#                        [--keep-apt]
# In a Dockerfile (no criu check possible while building): install-criu.sh --no-check --venv none
# Environment (the options win): CRIU_ROOT, CRIU_WRAPPER, VENV, CRIU_SUITE, CRIU_MIRROR,
#   CRIU_CHECK=0 (like --no-check), CRIU_SELF_TEST=1 (like --self-test), CRIU_FORCE=1,
#   CRIU_KEEP_APT=1, CRIU_APT_DIR (where the private apt state goes; default a fresh folder
#   under /var/tmp, removed at the end unless kept), CRIU_CHECK_VALID_UNTIL=true (enforce the
#   Release file's Valid-Until; off by default: snapshot/caching mirrors serve "expired" files),
#   CRIU_KEYRING (default /usr/share/keyrings/debian-archive-keyring.gpg).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRIU_ROOT=${CRIU_ROOT:-/opt/llmuxd/criu}
CRIU_WRAPPER=${CRIU_WRAPPER:-/usr/local/bin/criu}
# Default venv: the checkout's own .venv (../.venv from this script), when it exists.
if [[ -z "${VENV:-}" ]]; then
  if [[ -x "$SCRIPT_DIR/../.venv/bin/python" ]]; then VENV=$(cd "$SCRIPT_DIR/../.venv" && pwd); else VENV=none; fi
fi
CRIU_SUITE=${CRIU_SUITE:-forky}
CRIU_MIRROR=${CRIU_MIRROR:-http://deb.debian.org/debian}
CRIU_KEYRING=${CRIU_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
CRIU_CHECK=${CRIU_CHECK:-1}
CRIU_SELF_TEST=${CRIU_SELF_TEST:-auto}
CRIU_FORCE=${CRIU_FORCE:-0}
CRIU_KEEP_APT=${CRIU_KEEP_APT:-0}
CRIU_CHECK_VALID_UNTIL=${CRIU_CHECK_VALID_UNTIL:-false}
CRIU_VERSION_PREFIX=4.2.
PROTOBUF_SPEC='protobuf>=3.20,<7'

while (($#)); do
  case "$1" in
    --root) CRIU_ROOT=$2; shift 2 ;;
    --wrapper) CRIU_WRAPPER=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --suite) CRIU_SUITE=$2; shift 2 ;;
    --mirror) CRIU_MIRROR=$2; shift 2 ;;
    --no-check) CRIU_CHECK=0; shift ;;
    --self-test) CRIU_SELF_TEST=1; shift ;;
    --no-self-test) CRIU_SELF_TEST=0; shift ;;
    --force) CRIU_FORCE=1; shift ;;
    --keep-apt) CRIU_KEEP_APT=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-criu.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$CRIU_WRAPPER" == none ]] && CRIU_WRAPPER=""
[[ "$VENV" == none ]] && VENV=""

log() { printf '[install-criu] %s\n' "$*" >&2; }
die() { printf '[install-criu] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }

# Everything this script creates temporarily is removed on exit, whatever happens.
APT_DIR=""; APT_DIR_OURS=0; NEW_ROOT=""; T=""; pid=""
cleanup() {
  if [[ -n "$pid" && -e /proc/$pid ]] && grep -q '^sleep' "/proc/$pid/comm" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  [[ -n "$T" ]] && rm -rf "$T"
  [[ -n "$NEW_ROOT" ]] && rm -rf "$NEW_ROOT"
  [[ "$APT_DIR_OURS" == 1 && "$CRIU_KEEP_APT" != 1 ]] && rm -rf "$APT_DIR"
  true
}
trap cleanup EXIT
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }

[[ $EUID -eq 0 ]] || die "must run as root (dpkg -x into $CRIU_ROOT, criu check/dump need root)"
[[ "$CRIU_ROOT" = /* ]] || die "CRIU_ROOT must be an absolute path: $CRIU_ROOT"
case "$CRIU_ROOT/" in /tmp/*) die "CRIU_ROOT must not be under /tmp (a fresh container has a fresh /tmp): $CRIU_ROOT" ;; esac
CRIU_ROOT=${CRIU_ROOT%/}

ARCH=$(dpkg --print-architecture)
case "$ARCH" in
  amd64) TRIPLET=x86_64-linux-gnu; LDSO=ld-linux-x86-64.so.2 ;;
  arm64) TRIPLET=aarch64-linux-gnu; LDSO=ld-linux-aarch64.so.1 ;;
  *) die "unsupported architecture $ARCH" ;;
esac
LIBDIR=$CRIU_ROOT/usr/lib/$TRIPLET

# The packages measured to be enough (docs/measured.md). Names that changed in the suite are
# resolved at run time (virtual packages, soname/t64 renames); criu's own Depends closure in the
# suite is added, so new dependencies are picked up too.
BASE_PKGS=(criu libcompel1 libc6 libgnutls30t64 libnftables1 libnl-3-200 libprotobuf-c1 libbsd0
  libnet9 libuuid1 libmd0 libunistring5 libidn2-0 libp11-kit0 libtasn1-6 libnettle8t64
  libhogweed6t64 libgmp10 libffi8 libmnl0 libnftnl11 libjansson4 libxtables12 libedit2 zlib1g
  libzstd1 libtinfo6 libgcc-s1)
PY_PKGS=(python3-pycriu)
# Never taken from the closure: no code in them that criu needs.
CLOSURE_SKIP_RE='^(gcc-[0-9]+-base|libc-gconv-modules-extra|libc-bin|debconf|perl-base)$'

STAMP=$CRIU_ROOT/.llmuxd-criu-installed
CONFIG_KEY=$(printf '%s\n' "$CRIU_SUITE" "$CRIU_MIRROR" "$ARCH" "${BASE_PKGS[*]}" "${PY_PKGS[*]}" | sha256sum | cut -c1-16)

criu_direct() { "$LIBDIR/$LDSO" --library-path "$LIBDIR" "$CRIU_ROOT/usr/sbin/criu" "$@"; }

wrapper_text() {
  cat <<EOF
#!/bin/sh
# Generated by llmuxd packaging/install-criu.sh: CRIU from Debian $CRIU_SUITE in its own root
# ($CRIU_ROOT), run with its own loader and libraries; the system's libraries are not used.
exec $LIBDIR/$LDSO --library-path $LIBDIR $CRIU_ROOT/usr/sbin/criu "\$@"
EOF
}

installed_ok() {
  [[ "$CRIU_FORCE" != 1 && -f "$STAMP" ]] || return 1
  grep -qx "config=$CONFIG_KEY" "$STAMP" || return 1
  local v; v=$(criu_direct --version 2>/dev/null | sed -n 's/^Version: //p') || return 1
  [[ "$v" == "$CRIU_VERSION_PREFIX"* ]]
}

# --------------------------------------------------------------------------------------------
# 1-3. Download and extract (skipped when the stamp says it is done).
did_install=0
t_all=$(now)
if installed_ok; then
  log "CRIU root already installed in $CRIU_ROOT ($(grep '^criu=' "$STAMP" | cut -d= -f2)); skipping the download (--force redoes it)"
else
  t0=$(now)
  APT_DIR=${CRIU_APT_DIR:-}
  if [[ -z "$APT_DIR" ]]; then
    mkdir -p /var/tmp
    APT_DIR=$(mktemp -d /var/tmp/llmuxd-criu-apt.XXXXXX)
    APT_DIR_OURS=1
  fi
  mkdir -p "$APT_DIR"/{lists/partial,cache/archives/partial,state,empty.d,debs}
  : >"$APT_DIR/status"
  : >"$APT_DIR/preferences"
  echo "deb [signed-by=$CRIU_KEYRING] $CRIU_MIRROR $CRIU_SUITE main" >"$APT_DIR/sources.list"
  cat >"$APT_DIR/apt.conf" <<EOF
Dir::State "$APT_DIR/state";
Dir::State::Lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/status";
Dir::Cache "$APT_DIR/cache";
Dir::Etc::SourceList "$APT_DIR/sources.list";
Dir::Etc::SourceParts "$APT_DIR/empty.d";
Dir::Etc::Preferences "$APT_DIR/preferences";
Dir::Etc::PreferencesParts "$APT_DIR/empty.d";
APT::Architecture "$ARCH";
APT::Architectures { "$ARCH"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
EOF
  # The system's apt.conf.d still applies after APT_CONFIG (proxies etc.), so what must win is
  # given on the command line: its update hooks (appstream, PackageKit) are cleared so nothing
  # outside the private state is refreshed, and a binary cache is kept (Docker-style configs turn
  # it off, and then every apt-cache call re-parses the whole suite: ~1 s each). The Release
  # file's Valid-Until is not enforced by default: a mirror served from a snapshot, or through a
  # cache that keeps an older Release file, is "expired" for a rolling suite; the signature is
  # still checked.
  apt_() {
    local cmd=$1; shift
    APT_CONFIG="$APT_DIR/apt.conf" DEBIAN_FRONTEND=noninteractive "$cmd" \
      -o "Dir::Cache::pkgcache=$APT_DIR/cache/pkgcache.bin" -o "Dir::Cache::srcpkgcache=" \
      -o 'APT::Update::Post-Invoke-Success::=' -o 'APT::Update::Post-Invoke::=' -o 'DPkg::Post-Invoke::=' \
      -o "Acquire::Check-Valid-Until=$CRIU_CHECK_VALID_UNTIL" "$@"
  }
  log "private apt state in $APT_DIR: deb $CRIU_MIRROR $CRIU_SUITE main"
  apt_ apt-get -qq update || die "apt-get update of $CRIU_SUITE failed (network? keyring $CRIU_KEYRING?)"

  has_candidate() {  # real package with a downloadable version
    apt_ apt-cache show --no-all-versions "$1" 2>/dev/null | grep "^Version:" >/dev/null  # no -q: SIGPIPE + pipefail
  }
  resolve_name() {  # prints the name to download for $1, or nothing
    local name=$1 prov stem cands
    if has_candidate "$name"; then echo "$name"; return; fi
    # A virtual package provided by exactly one real package (e.g. the t64 renames provide the old name).
    prov=$(apt_ apt-cache showpkg "$name" 2>/dev/null | awk '/^Reverse Provides:/{f=1;next} f&&NF{print $1}' | sort -u)
    if [[ -n "$prov" && $(wc -l <<<"$prov") -eq 1 ]] && has_candidate "$prov"; then echo "$prov"; return; fi
    # A new soname or a t64 suffix: same stem, other trailing digits/t64.
    stem=$(sed -E 's/t64$//; s/[0-9.]+$//' <<<"$name")
    cands=$(apt_ apt-cache pkgnames "$stem" 2>/dev/null | grep -E "^${stem//+/\\+}[0-9.]*(t64)?$" | sort -V | tail -n 1 || true)
    if [[ -n "$cands" ]] && has_candidate "$cands"; then echo "$cands"; return; fi
  }

  declare -A want=()
  missing=()
  for p in "${BASE_PKGS[@]}" "${PY_PKGS[@]}"; do
    r=$(resolve_name "$p")
    if [[ -z "$r" ]]; then missing+=("$p"); continue; fi
    [[ "$r" != "$p" ]] && log "package $p is called $r in $CRIU_SUITE"
    want[$r]=1
  done
  ((${#missing[@]} == 0)) || die "package(s) not found in Debian $CRIU_SUITE ($CRIU_MIRROR): ${missing[*]}; update BASE_PKGS in $0"
  # criu's run-time dependency closure in the suite (libraries only).
  while read -r p; do
    [[ -z "$p" || "$p" == "<"* || "$p" =~ $CLOSURE_SKIP_RE ]] && continue
    [[ -z "${want[$p]:-}" ]] && { log "adding criu dependency $p"; want[$p]=1; }
  done < <(apt_ apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
             --no-breaks --no-replaces --no-enhances criu 2>/dev/null | grep -v '^ ' | sort -u)

  pkgs=("${!want[@]}")
  log "downloading ${#pkgs[@]} packages from $CRIU_SUITE"
  (cd "$APT_DIR/debs" && apt_ apt-get -qq download "${pkgs[@]}") \
    || die "apt-get download failed for: ${pkgs[*]}"

  log "extracting into $CRIU_ROOT"
  NEW_ROOT=$CRIU_ROOT.new
  rm -rf "$NEW_ROOT"
  mkdir -p "$NEW_ROOT"
  versions=()
  for deb in "$APT_DIR"/debs/*.deb; do
    dpkg -x "$deb" "$CRIU_ROOT.new"
    versions+=("$(dpkg-deb -f "$deb" Package)=$(dpkg-deb -f "$deb" Version)")
  done
  # Documentation is not needed (a few MB).
  rm -rf "$CRIU_ROOT.new"/usr/share/{doc,man,lintian,locale,bug}
  [[ -x "$CRIU_ROOT.new/usr/lib/$TRIPLET/$LDSO" ]] || die "no loader $LDSO in the extracted libc6"
  [[ -x "$CRIU_ROOT.new/usr/sbin/criu" ]] || die "no usr/sbin/criu in the extracted criu package"
  {
    echo "config=$CONFIG_KEY"
    echo "suite=$CRIU_SUITE"
    echo "mirror=$CRIU_MIRROR"
    echo "installed=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '%s\n' "${versions[@]}" | sort
  } >"$CRIU_ROOT.new/.llmuxd-criu-installed"
  # Swap in the new root (a running criu keeps its mapped files).
  if [[ -e "$CRIU_ROOT" ]]; then rm -rf "$CRIU_ROOT.old"; mv "$CRIU_ROOT" "$CRIU_ROOT.old"; fi
  mv "$CRIU_ROOT.new" "$CRIU_ROOT"
  NEW_ROOT=""
  rm -rf "$CRIU_ROOT.old"
  did_install=1
  log "installed ${#versions[@]} packages in $(since "$t0") s ($(du -sh "$CRIU_ROOT" | cut -f1))"
fi

# Every shared library criu loads must come from ROOT (the private loader would otherwise fall
# back to the system's /etc/ld.so.cache and old libraries).
check_libs() {
  local out bad
  out=$("$LIBDIR/$LDSO" --library-path "$LIBDIR" --list "$CRIU_ROOT/usr/sbin/criu" 2>&1) || die "criu's libraries do not load: $out"
  bad=$(grep '=>' <<<"$out" | grep -v "=> $CRIU_ROOT/" || true)
  [[ -z "$bad" ]] || die "libraries not found in $CRIU_ROOT (add their packages to BASE_PKGS): $bad"
}
check_libs
version=$(criu_direct --version | sed -n 's/^Version: //p')
[[ "$version" == "$CRIU_VERSION_PREFIX"* ]] || die "criu --version says '$version', expected ${CRIU_VERSION_PREFIX}x"
log "criu $version in $CRIU_ROOT"

# --------------------------------------------------------------------------------------------
# 4. The wrapper.
if [[ -n "$CRIU_WRAPPER" ]]; then
  if [[ -f "$CRIU_WRAPPER" ]] && cmp -s <(wrapper_text) "$CRIU_WRAPPER"; then
    log "wrapper $CRIU_WRAPPER up to date"
  else
    mkdir -p "$(dirname "$CRIU_WRAPPER")"
    wrapper_text >"$CRIU_WRAPPER.new"
    chmod 0755 "$CRIU_WRAPPER.new"
    mv "$CRIU_WRAPPER.new" "$CRIU_WRAPPER"
    log "wrote wrapper $CRIU_WRAPPER"
  fi
  CRIU=("$CRIU_WRAPPER")
else
  CRIU=(criu_direct)
fi
wv=$("${CRIU[@]}" --version | sed -n 's/^Version: //p')
[[ "$wv" == "$version" ]] || die "${CRIU[*]} --version says '$wv', expected $version"

# --------------------------------------------------------------------------------------------
# 5. pycriu in the venv.
did_venv=0
if [[ -n "$VENV" ]]; then
  PY=$VENV/bin/python
  [[ -x "$PY" ]] || die "no Python in venv $VENV (create it first, or pass --venv none)"
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  pth=$site/llmuxd-criu.pth
  want_pth="$CRIU_ROOT/usr/lib/python3/dist-packages"
  if [[ "$(cat "$pth" 2>/dev/null)" != "$want_pth" ]]; then
    echo "$want_pth" >"$pth"
    log "wrote $pth -> $want_pth"
    did_venv=1
  fi
  if ! "$PY" - <<'EOF' 2>/dev/null
import google.protobuf as p
v = tuple(int(x) for x in p.__version__.split(".")[:2])
assert (3, 20) <= v < (7, 0), v
EOF
  then
    log "pip install '$PROTOBUF_SPEC' into $VENV"
    "$PY" -m pip install -q "$PROTOBUF_SPEC" || die "pip install $PROTOBUF_SPEC failed"
    did_venv=1
  fi
  "$PY" -c 'import pycriu, pycriu.images' || die "$PY cannot import pycriu"
  log "pycriu importable from $VENV (protobuf $("$PY" -c 'import google.protobuf as p; print(p.__version__)'))"
fi

# --------------------------------------------------------------------------------------------
# 6. Checks on this machine.
if [[ "$CRIU_CHECK" == 1 ]]; then
  t0=$(now)
  out=$("${CRIU[@]}" check 2>&1) || die "criu check failed: $out"
  log "criu check: $(tail -n 1 <<<"$out") ($(since "$t0") s)"
  if [[ "$CRIU_SELF_TEST" == 1 || ("$CRIU_SELF_TEST" == auto && $((did_install + did_venv)) -gt 0) ]]; then
    T=$(mktemp -d /tmp/llmuxd-criu-selftest.XXXXXX)
    mkdir -p "$T/img"
    : >"$T/stdin"
    # A tree with nothing connecting it to the outside: own session, stdio from/to files, no
    # inherited fds.
    (
      for fd in /proc/$BASHPID/fd/*; do fd=${fd##*/}; ((fd > 2)) && eval "exec $fd>&-"; done
      exec setsid sleep 1000 <"$T/stdin" >>"$T/out" 2>&1
    ) &
    pid=$!
    disown "$pid"   # bash still reaps it, silently ("Killed" is expected: criu dump ends it)
    for _ in $(seq 50); do grep -q '^sleep' "/proc/$pid/comm" 2>/dev/null && break; sleep 0.05; done
    t0=$(now)
    "${CRIU[@]}" dump -t "$pid" -D "$T/img" --shell-job -o dump.log -v4 \
      || die "self-test: criu dump failed; see log:$(echo; tail -n 20 "$T/img/dump.log")"
    t_dump=$(since "$t0")
    # The dumped tree takes a moment to exit; its PID must be free for the restore.
    for _ in $(seq 250); do [[ -e /proc/$pid ]] || break; sleep 0.02; done
    [[ ! -e /proc/$pid ]] || die "self-test: dumped process $pid did not exit"
    if [[ -n "$VENV" ]]; then
      dpid=$("$VENV/bin/python" -c '
import sys, pycriu
with open(sys.argv[1], "rb") as f:
    img = pycriu.images.load(f)
print(img["entries"][0]["pid"])' "$T/img/pstree.img") || die "self-test: pycriu could not decode pstree.img"
      [[ "$dpid" == "$pid" ]] || die "self-test: pstree.img says pid $dpid, expected $pid"
      log "self-test: pycriu decoded pstree.img (pid $dpid)"
    fi
    t0=$(now)
    "${CRIU[@]}" restore -D "$T/img" --restore-detached --shell-job -o restore.log -v4 \
      || die "self-test: criu restore failed; see log:$(echo; tail -n 20 "$T/img/restore.log")"
    t_restore=$(since "$t0")
    grep -q '^sleep' "/proc/$pid/comm" 2>/dev/null || die "self-test: restored process $pid is not running"
    kill -9 "$pid"
    for _ in $(seq 100); do
      [[ -e /proc/$pid ]] || break
      [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && break
      sleep 0.02
    done
    pid=""
    log "self-test: dump ${t_dump} s, restore ${t_restore} s (sleep, pid reused, killed after)"
  fi
fi
log "done in $(since "$t_all") s: criu $version, root $CRIU_ROOT${CRIU_WRAPPER:+, wrapper $CRIU_WRAPPER}${VENV:+, venv $VENV}"
