#!/bin/sh
# Install an edgedistill bundle on an offline host. Needs a POSIX shell, tar, sha256sum and
# docker or podman (openssl only to check a signature). Nothing is loaded or changed on the
# host until every checksum (and the signature, when PUBLIC_KEY is given) has been verified.
#
#   install-bundle.sh BUNDLE.tar            install (or no-op when this version is installed);
#                                           a model-only tar (make build-bundle MODEL_ONLY=1)
#                                           installs only where its images already are
#   install-bundle.sh --rollback NAME       switch back to the previously installed version
#   install-bundle.sh --stop NAME           stop the services
#   install-bundle.sh --registry HOST:PORT[/PATH] BUNDLE.tar
#                                           verify, push the runtime, router and model images to
#                                           the site's registry and write the Kubernetes overlay
#                                           pinned to their digests (kubernetes/site); starts nothing
#
# Settings (environment): PREFIX (default /opt/edgedistill), CONTAINER_ENGINE (docker|podman,
# may carry flags), PUBLIC_KEY (Ed25519 public key, PEM), RUNTIME_PORT (50051),
# ROUTER_PORT (50052), HTTP_PORT (unset: none; the router's HTTP API: OpenAI's chat
# completions, /v1/predict, /health), BIND (127.0.0.1), RUNTIME_THREADS, START (1; 0 = install only),
# ROUTER_MODE (local_only|hybrid|api_only), FALLBACK_MODEL, FALLBACK_API_BASE; with --registry:
# KUBE_OVERLAY (cpu|gpu, default cpu), KUBE_NAMESPACE, REGISTRY_TLS_VERIFY (1; 0 for a plain
# HTTP registry, podman only: docker takes it from its daemon's insecure-registries).
# Secrets are files on the host, mounted read-only and never copied under PREFIX (give them
# again when restarting); they must be readable by the services' uid 10001:
# FALLBACK_KEY_FILE (the router's API key), AUTH_TOKEN_FILE (bearer token both services ask
# for; the router presents it to the runtime).
set -eu

PREFIX=${PREFIX:-/opt/edgedistill}
RUNTIME_PORT=${RUNTIME_PORT:-50051}
ROUTER_PORT=${ROUTER_PORT:-50052}
BIND=${BIND:-127.0.0.1}
START=${START:-1}

say() { printf '%s\n' "install-bundle: $*"; }
refuse() { printf '%s\n' "install-bundle: REFUSED: $*" >&2; exit 1; }

# The engine, chosen once when first needed: CONTAINER_ENGINE, else a docker whose daemon
# answers, else podman (a docker CLI without a reachable daemon is no engine, as in
# build-bundle.sh). A bundle without images installs with START=0 and no engine at all.
need_engine() {
  if [ -n "${ENGINE:-}" ]; then
    return
  elif [ -n "${CONTAINER_ENGINE:-}" ]; then
    ENGINE=$CONTAINER_ENGINE
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  elif command -v docker >/dev/null 2>&1; then
    refuse "docker is installed but its daemon does not answer (docker info failed) and podman is not installed: start the docker daemon, or install podman"
  else
    refuse "neither docker nor podman is installed; install one, or set CONTAINER_ENGINE"
  fi
}

engine() {
  # shellcheck disable=SC2086  # CONTAINER_ENGINE may carry flags (e.g. podman --root ...)
  $ENGINE "$@"
}

# A secret file's absolute path, or a refusal that says what is wrong with it.
secret_file() {
  case $2 in
    *[[:space:]]*) refuse "$1: the path must not contain spaces" ;;
    /*) ;;
    *) refuse "$1: give an absolute path" ;;
  esac
  [ -f "$2" ] && [ -r "$2" ] || refuse "$1: $2 is not a readable file"
  printf '%s' "$2"
}

stop_services() {
  name=$1
  need_engine
  # One at a time: podman removes nothing when one of the names it is given does not exist.
  for container in "$name-router" "$name-runtime"; do
    engine rm -f "$container" >/dev/null 2>&1 || true
  done
  engine network rm "$name-net" >/dev/null 2>&1 || true
}

# Mount options for the secrets (checked before anything on the host changes).
secret_mounts() {
  runtime_secrets="" router_secrets=""
  if [ -n "${AUTH_TOKEN_FILE:-}" ]; then
    token=$(secret_file AUTH_TOKEN_FILE "$AUTH_TOKEN_FILE"):/run/secrets/auth_token:ro
    runtime_secrets="-v $token -e EDGEDISTILL_AUTH_TOKEN_FILE=/run/secrets/auth_token"
    router_secrets="-v $token -e EDGEDISTILL_ROUTER_AUTH_TOKEN_FILE=/run/secrets/auth_token"
    router_secrets="$router_secrets -e EDGEDISTILL_ROUTER_LOCAL_TOKEN_FILE=/run/secrets/auth_token"
  fi
  if [ -n "${FALLBACK_KEY_FILE:-}" ]; then
    key=$(secret_file FALLBACK_KEY_FILE "$FALLBACK_KEY_FILE"):/run/secrets/fallback_api_key:ro
    router_secrets="$router_secrets -v $key"
    router_secrets="$router_secrets -e EDGEDISTILL_ROUTER_FALLBACK_KEY_FILE=/run/secrets/fallback_api_key"
  fi
}

# Start the release's two containers and wait until they serve. On failure: return 1 with
# $start_failure saying what failed (the caller decides what the host goes back to).
start_services() {
  name=$1 serving=$2 start_failure=""  # not $release: sh variables are global
  need_engine
  runtime_image=$(cat "$serving/images/runtime.ref")
  router_image=$(cat "$serving/images/router.ref")
  stop_services "$name"
  engine network create "$name-net" >/dev/null 2>&1 || true
  router_http=""
  [ -z "${HTTP_PORT:-}" ] || router_http="-e EDGEDISTILL_ROUTER_HTTP_PORT=8080 -p $BIND:$HTTP_PORT:8080"
  hardening="--init --read-only --cap-drop=ALL --security-opt=no-new-privileges --tmpfs /tmp --restart=unless-stopped"
  # shellcheck disable=SC2086  # the option strings are word-split on purpose (no spaces inside)
  error=$(engine run -d --name "$name-runtime" --network "$name-net" --network-alias runtime $hardening \
    -v "$serving/bundle:/bundle:ro" -e "EDGEDISTILL_N_THREADS=${RUNTIME_THREADS:-2}" \
    $runtime_secrets -p "$BIND:$RUNTIME_PORT:50051" "$runtime_image" 2>&1 >/dev/null) \
    || { start_failure="the runtime container did not start: $error"; return 1; }
  # shellcheck disable=SC2086
  error=$(engine run -d --name "$name-router" --network "$name-net" $hardening \
    -v "$serving/bundle:/bundle:ro" -e 'EDGEDISTILL_ROUTER_LOCAL=["runtime:50051"]' \
    -e "EDGEDISTILL_ROUTER_MODE=${ROUTER_MODE:-local_only}" \
    -e "EDGEDISTILL_ROUTER_FALLBACK_MODEL=${FALLBACK_MODEL:-}" \
    -e "EDGEDISTILL_ROUTER_FALLBACK_API_BASE=${FALLBACK_API_BASE:-}" \
    $router_secrets $router_http -p "$BIND:$ROUTER_PORT:50052" "$router_image" 2>&1 >/dev/null) \
    || { start_failure="the router container did not start: $error"; return 1; }
  say "waiting for the runtime's gRPC health to say SERVING"
  i=0
  until engine exec "$name-runtime" edgedistill health --target 127.0.0.1:50051 >/dev/null 2>&1; do
    i=$((i + 1))
    # A runtime that refuses its model exits (and restarts): no use waiting out the timeout.
    restarts=$(engine inspect --format '{{.RestartCount}}' "$name-runtime" 2>/dev/null || echo 0)
    if [ "${restarts:-0}" -gt 0 ] || [ "$i" -gt 120 ]; then
      engine logs "$name-runtime" 2>&1 | tail -20 >&2
      start_failure="the runtime did not become healthy (its last log lines are above)"
      [ "${restarts:-0}" -eq 0 ] || start_failure="the runtime exited at start (its last log lines are above)"
      return 1
    fi
    sleep 1
  done
  # A router with a fallback is SERVING before it sees its runtime; wait for that too.
  router_service=edgedistill.router.LocalRuntime
  [ "${ROUTER_MODE:-local_only}" != api_only ] || router_service=
  until engine exec "$name-router" edgedistill health --target 127.0.0.1:50052 \
    --service "$router_service" >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 180 ]; then
      engine logs "$name-router" 2>&1 | tail -20 >&2
      start_failure="the router did not become healthy (its last log lines are above)"
      return 1
    fi
    sleep 1
  done
  say "SERVING: runtime on $BIND:$RUNTIME_PORT, router on $BIND:$ROUTER_PORT"
  say "call it:  grpcurl -plaintext -d '{\"inputs\": {...}}' $BIND:$ROUTER_PORT edgedistill.v1.Inference/Predict"
  say "      or: edgedistill predict --target $BIND:$ROUTER_PORT --input field=value"
  [ -z "${HTTP_PORT:-}" ] || say "      or: curl -d '{\"inputs\": {...}}' http://$BIND:$HTTP_PORT/v1/predict"
}

# Point NAME (current or previous) at a release folder, or remove it when there is none.
set_link() {
  if [ -n "$2" ]; then
    ln -sfn "$2" "$home/$1.new" && mv -T "$home/$1.new" "$home/$1"
  else
    rm -f "$home/$1"
  fi
}

# Push one image; its registry digest goes to $work/digest (podman writes it, docker prints it).
push_one() {
  rm -f "$work/digest"
  case $ENGINE in
    *podman*)
      # shellcheck disable=SC2086  # $2 is one flag or none
      engine push -q $2 --digestfile "$work/digest" "$1" > "$work/pushed" 2>&1 ;;
    *)
      engine push "$1" > "$work/pushed" 2>&1 || return 1
      sed -n 's/.*digest: \(sha256:[0-9a-f]\{64\}\).*/\1/p' "$work/pushed" > "$work/digest" ;;
  esac
}

# Push the release's images to $REGISTRY; each digest goes to images/NAME.digest.
push_images() {
  staging=$1
  tls=""
  case $ENGINE in
    *podman*) [ "${REGISTRY_TLS_VERIFY:-1}" = 1 ] || tls=--tls-verify=false ;;
  esac
  for image in runtime router model; do
    [ -f "$staging/images/$image.ref" ] \
      || refuse "the bundle has no $image image: rebuild it with make build-bundle, which makes all three"
    remote=$REGISTRY/edgedistill-$image:$version
    engine tag "$(cat "$staging/images/$image.ref")" "$remote"
    push_one "$remote" "$tls" || { tail -5 "$work/pushed" >&2; refuse "pushing $remote failed"; }
    grep -q '^sha256:[0-9a-f]\{64\}$' "$work/digest" || refuse "no digest came back for $remote"
    cp "$work/digest" "$staging/images/$image.digest"
    say "pushed $remote ($(cat "$work/digest"))"
  done
}

# The site overlay: the shipped manifests with the pushed images pinned by digest.
write_overlay() {
  kube=$1/kubernetes
  overlay=${KUBE_OVERLAY:-cpu}
  [ -d "$kube/overlays/$overlay" ] || refuse "KUBE_OVERLAY=$overlay: no such overlay (cpu, gpu)"
  {
    printf '%s\n' "# Written by install.sh --registry: $name $version, images in $REGISTRY by digest." \
      "# kubectl apply -k $release/kubernetes/site" \
      "apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization"
    [ -z "${KUBE_NAMESPACE:-}" ] || printf 'namespace: %s\n' "$KUBE_NAMESPACE"
    printf '%s\n' "resources:" "  - ../overlays/$overlay" "patches:" "  - path: resources.yaml" "images:"
    for image in runtime router model; do
      printf '  - name: localhost/edgedistill-%s\n    newName: %s/edgedistill-%s\n    digest: %s\n' \
        "$image" "$REGISTRY" "$image" "$(cat "$1/images/$image.digest")"
    done
  } > "$kube/site/kustomization.yaml"
}

REGISTRY=""
if [ "${1:-}" = --registry ]; then
  REGISTRY=${2:?usage: install-bundle.sh --registry HOST:PORT[/PATH] BUNDLE.tar}
  shift 2
  START=0
  case $REGISTRY in
    */|*[[:space:]]*|*://*) refuse "--registry $REGISTRY: give HOST:PORT[/PATH], no scheme, no trailing slash" ;;
  esac
fi

case "${1:-}" in
  --rollback)
    name=${2:?usage: install-bundle.sh --rollback NAME}
    home=$PREFIX/$name
    [ -L "$home/previous" ] || refuse "no previous version of $name to roll back to"
    current=$(readlink "$home/current")
    previous=$(readlink "$home/previous")
    ln -sfn "$previous" "$home/current.new" && mv -T "$home/current.new" "$home/current"
    ln -sfn "$current" "$home/previous.new" && mv -T "$home/previous.new" "$home/previous"
    say "rolled $name back to $(basename "$previous")"
    if [ "$START" = 1 ]; then
      secret_mounts
      start_services "$name" "$home/current" || refuse "$start_failure"
    fi
    exit 0 ;;
  --stop)
    stop_services "${2:?usage: install-bundle.sh --stop NAME}"; exit 0 ;;
  ""|-h|--help)
    sed -n '2,14p' "$0"; exit 2 ;;
esac

archive=$1
[ -f "$archive" ] || refuse "$archive: no such file"
secret_mounts
work=$(mktemp -d "${TMPDIR:-/tmp}/edgedistill-install.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# 1. Unpack into a scratch folder; a truncated archive fails here.
tar -xf "$archive" -C "$work" 2>/dev/null || refuse "$archive cannot be unpacked (truncated or corrupt)"
set -- "$work"/*/
[ "$#" -eq 1 ] && [ -f "$1/manifest.json" ] || refuse "$archive is not an edgedistill bundle (no manifest)"
root=${1%/}

# 2. The signature, when a public key is given.
if [ -n "${PUBLIC_KEY:-}" ]; then
  [ -f "$root/manifest.json.sig" ] || refuse "PUBLIC_KEY is set but the bundle is not signed"
  command -v openssl >/dev/null 2>&1 || refuse "checking the signature needs openssl"
  openssl pkeyutl -verify -pubin -inkey "$PUBLIC_KEY" -rawin -in "$root/manifest.json" \
    -sigfile "$root/manifest.json.sig" >/dev/null 2>&1 || refuse "the manifest's signature does not verify"
  say "signature verified"
fi

# 3. Every member's checksum, from the manifest (one "path": "sha256" per line).
sed -n 's/^    "\(.*\)": "\([0-9a-f]\{64\}\)",\{0,1\}$/\2  \1/p' "$root/manifest.json" > "$work/sums"
[ -s "$work/sums" ] || refuse "the manifest lists no files"
members=$(cd "$root" && find . -type f ! -path ./manifest.json ! -path ./manifest.json.sig | wc -l)
[ "$members" -eq "$(wc -l < "$work/sums")" ] || refuse "the bundle holds files the manifest does not list"
(cd "$root" && sha256sum --quiet --strict -c "$work/sums") >/dev/null 2>&1 \
  || refuse "a checksum does not match: the bundle was changed or damaged"
say "all $(wc -l < "$work/sums" | tr -d ' ') checksums verified"

name=$(sed -n 's/^  "name": "\(.*\)",$/\1/p' "$root/manifest.json")
version=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$root/manifest.json")
[ -n "$name" ] && [ -n "$version" ] || refuse "the manifest has no name or version"
home=$PREFIX/$name
release=$home/releases/$version

# 4. Same version already installed: nothing to do.
if [ -z "$REGISTRY" ] && [ -f "$release/manifest.json" ] && cmp -s "$release/manifest.json" "$root/manifest.json"; then
  say "$name $version is already installed"
  exit 0
fi

# A model-only release runs on images an earlier full install loaded (same IDs): refuse
# before anything changes when the host lacks one.
if [ -f "$root/images/requires" ] && [ ! -f "$root/images/images.tar" ]; then
  need_engine
  while read -r image id; do
    engine image inspect "$id" >/dev/null 2>&1 || refuse "this model-only release runs on the $image image $id, which this host does not hold: install the full tar of this build (make build-bundle without MODEL_ONLY) instead"
  done < "$root/images/requires"
  say "model-only release: its runtime and router images are on this host"
fi

# 5. Load the images, then install the release and switch to it.
mkdir -p "$home/releases"
staging=$home/releases/.$version.partial
rm -rf "$staging"
cp -R "$root" "$staging"
chmod -R a+rX "$staging"   # the services run as an unprivileged user and mount it read-only
if [ -f "$staging/images/images.tar" ]; then
  # One docker-archive holds both images, so their shared layers travel once.
  need_engine
  engine load -i "$staging/images/images.tar" > "$work/loaded" 2>&1 \
    || { tail -5 "$work/loaded" >&2; refuse "the images did not load"; }
  for image in runtime router; do
    ref=$(sed -n "s/^Loaded image[^:]*: *\(.*edgedistill-$image:.*\)$/\1/p" "$work/loaded" | tail -1)
    [ -n "$ref" ] || refuse "the $image image is not in images/images.tar"
    printf '%s\n' "$ref" > "$staging/images/$image.ref"
  done
  # The model image (bundles built before it existed have none) is for --registry.
  ref=$(sed -n "s/^Loaded image[^:]*: *\(.*edgedistill-model:.*\)$/\1/p" "$work/loaded" | tail -1)
  [ -z "$ref" ] || printf '%s\n' "$ref" > "$staging/images/model.ref"
  rm -f "$staging/images/images.tar"   # loaded into the engine; keep the host's disk free
elif [ -f "$staging/images/requires" ]; then
  while read -r image id; do
    printf '%s\n' "$id" > "$staging/images/$image.ref"
  done < "$staging/images/requires"
fi
if [ -n "$REGISTRY" ]; then
  [ -d "$staging/kubernetes/site" ] || refuse "the bundle carries no Kubernetes manifests: rebuild it with make build-bundle"
  need_engine
  push_images "$staging"
  write_overlay "$staging"
fi
if [ -f "$staging/images/runtime.ref" ]; then
  # compose.yaml's variables for this release (no secrets): `compose up` runs what is installed.
  printf 'BUNDLE_DIR=%s\nRUNTIME_IMAGE=%s\nROUTER_IMAGE=%s\n' "$release/bundle" \
    "$(cat "$staging/images/runtime.ref")" "$(cat "$staging/images/router.ref")" > "$staging/.env"
fi
rm -rf "$release"
mv "$staging" "$release"
was_current=$(readlink "$home/current" 2>/dev/null || true)
was_previous=$(readlink "$home/previous" 2>/dev/null || true)
if [ -n "$was_current" ] && [ "$was_current" != "$release" ]; then
  set_link previous "$was_current"
fi
set_link current "$release"
say "installed $name $version under $home (previous version kept for --rollback)"
[ -z "$REGISTRY" ] || say "apply it: kubectl apply -k $release/kubernetes/site"

if [ "$START" = 1 ] && [ -f "$release/images/runtime.ref" ] && ! start_services "$name" "$home/current"; then
  # Leave the host as it was: the release it had is current (and running) again, and this one
  # is removed, so running install.sh again installs and starts it.
  failure=$start_failure
  stop_services "$name"
  set_link current "$was_current"
  set_link previous "$was_previous"
  [ "$was_current" = "$release" ] || rm -rf "$release"
  if [ -n "$was_current" ] && [ "$was_current" != "$release" ]; then
    if start_services "$name" "$home/current"; then
      say "$(basename "$was_current") is current and running again"
    else
      say "$(basename "$was_current") is current again but did not start: $start_failure"
    fi
  fi
  refuse "$name $version did not start: $failure; it is not installed (fix the cause and run install-bundle.sh again)"
fi
