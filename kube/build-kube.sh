#!/usr/bin/env bash
# Build Kubernetes v1.20.2 commands from Debian bookworm's `kubernetes`
# source package into kube/.cache/bin (gitignored):
#   kube/build-kube.sh [COMMAND...]     (default: kube-apiserver)
# COMMAND is a directory of cmd/ (kube-apiserver, kubelet,
# kube-controller-manager, kube-scheduler, kubectl). No registry ships a
# binary we can fetch here, so each is built once and cached: a second run
# finds kube/.cache/bin/COMMAND and returns at once.
# Cost of a cold build of the API server: ~8 min, 1.3 GB peak, 1.1 GB Go
# cache (kube/.cache/go); the other four after it took 4.7 min together
# (2 vCPUs, a QEMU guest running beside), 400 MB of binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$PWD/kube/.cache"
commands=("$@")
version() {  # COMMAND: print its version (kubectl has no --version)
  if [ "$1" = kubectl ]; then "$cache/bin/$1" version --client --short; else "$cache/bin/$1" --version; fi
}
[ ${#commands[@]} -gt 0 ] || commands=(kube-apiserver)
missing=()
for command in "${commands[@]}"; do
  case "$command" in
    kube-apiserver|kubelet|kube-controller-manager|kube-scheduler|kubectl) ;;
    *) echo "kube/build-kube.sh: unknown command '$command' (kube-apiserver, kubelet," \
         "kube-controller-manager, kube-scheduler or kubectl)" >&2; exit 2 ;;
  esac
  [ -x "$cache/bin/$command" ] && version "$command" >/dev/null 2>&1 || missing+=("$command")
done
[ ${#missing[@]} -gt 0 ] || exit 0
[ "$(id -u)" = 0 ] || { echo "kube/build-kube.sh: run as root (it installs golang-go)" >&2; exit 1; }

need=()
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# The source package, through a private apt state that knows deb-src
# (the host's sources stay as they are).
apt_state="$cache/apt"
mkdir -p "$apt_state/lists/partial" "$apt_state/archives/partial" "$apt_state/etc" "$cache/src"
echo "deb-src http://deb.debian.org/debian bookworm main" >"$apt_state/etc/sources.list"
aptp() {
  apt-get -q -o Dir::State="$apt_state" -o Dir::Cache="$apt_state" \
    -o Dir::Etc::SourceList="$apt_state/etc/sources.list" \
    -o Dir::Etc::SourceParts=/nonexistent -o APT::Sandbox::User=root "$@"
}
tree="$cache/gopath/src/k8s.io/kubernetes"
if [ ! -f "$tree/.unpacked" ]; then
  if ! ls "$cache"/src/kubernetes_*.dsc >/dev/null 2>&1; then
    aptp update >/dev/null
    (cd "$cache/src" && aptp source --download-only kubernetes >/dev/null)
  fi
  rm -rf "$tree" "$cache/src/unpacked"
  dsc=$(ls "$cache"/src/kubernetes_*.dsc | head -1)
  dpkg-source --no-check -x "$dsc" "$cache/src/unpacked" >/dev/null
  mkdir -p "$(dirname "$tree")"
  mv "$cache/src/unpacked" "$tree"
  # The vendored reflect2 1.0.1 breaks on Go >= 1.18: Debian's 1.0.2 instead.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  touch "$tree/.unpacked"
fi

export GOPATH="$cache/gopath" GO111MODULE=off GOFLAGS= CGO_ENABLED=0
export GOCACHE="$cache/go" HOME="${HOME:-/root}"
cd "$tree"
if [[ " ${missing[*]} " == *" kube-apiserver "* ]] && [ ! -f pkg/generated/openapi/zz_generated.openapi.go ]; then
  # kube-apiserver needs the OpenAPI definitions generated first, over the
  # packages tagged +k8s:openapi-gen=.
  go build -o "$cache/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # (in any file of the package: Quantity's tag is in quantity.go), leaving
  # out tests, examples and the sample API groups.
  pkgs=$(grep -rl --include='*.go' '+k8s:openapi-gen=' pkg staging/src 2>/dev/null \
    | grep -v -e '_test\.go$' -e /testdata/ -e /test/ -e /examples/ -e code-generator \
      -e sample-apiserver -e testapigroup -e /apis/example \
    | xargs -n1 dirname | sort -u \
    | sed -e 's#^staging/src/##' -e 's#^pkg/#k8s.io/kubernetes/pkg/#' \
    | paste -sd, -)
  "$cache/bin/openapi-gen" --input-dirs "$pkgs" \
    --output-package k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi --go-header-file hack/boilerplate/boilerplate.generatego.txt \
    --report-filename /dev/null
fi
# GOPATH mode: the version package is linked under its vendored path.
v=k8s.io/kubernetes/vendor/k8s.io/component-base/version
ldflags="-X $v.gitVersion=v1.20.2 -X $v.gitMajor=1 -X $v.gitMinor=20 -X $v.gitTreeState=clean"
mkdir -p "$cache/bin"
for command in "${missing[@]}"; do
  out="$cache/bin/$command"
  go build -ldflags "$ldflags" -o "$out.tmp" "./cmd/$command"
  mv "$out.tmp" "$out"
  version "$command"
done
