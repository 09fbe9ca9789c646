# Sourced, not run: `apt_install_missing PKG...` installs those of the Debian packages PKG...
# that are not installed yet (apt-get update first; nothing at all when none is missing), saying
# which through the caller's `log` function when it has one.  Its status is apt-get's: a caller
# under `set -e` stops there, one that tolerates the failure writes `apt_install_missing ... ||`.
# Used by packaging/install.sh, packaging/docker/build.sh, scripts/setup.sh and the test images'
# builds (tests/infra/build-image.sh, tests/infra/build-docker-base.sh), each sourcing it by a
# path relative to its own location.

apt_install_missing() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "ok installed" >/dev/null || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if declare -F log >/dev/null; then log "installing Debian packages: ${missing[*]}"; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
