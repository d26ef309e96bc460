# The exec agent image (sandhub-agent:<tag>): nothing but the static binary.
# Kubernetes pods and ECS tasks run it as an init container,
# `/sandhub-agent install /sandhub/sandhub-agent`, which copies it into a
# volume the container's own image then runs it from (deploy/README.md).
# No USER: on ECS the init container must write into a task volume owned by
# root; on Kubernetes the pod's securityContext runs it as 65532 and fsGroup
# makes the emptyDir writable.
# Build (from the repository root; see deploy/README.md):
#   mkdir -p /tmp/sandhub-agent-image
#   CGO_ENABLED=0 go build -trimpath -tags grpcnotrace -ldflags='-s -w' -o /tmp/sandhub-agent-image/sandhub-agent ./agent/cmd/sandhub-agent
#   docker build -f deploy/agent.Dockerfile -t <registry>/sandhub-agent:<tag> /tmp/sandhub-agent-image
FROM scratch
COPY sandhub-agent /sandhub-agent
ENTRYPOINT ["/sandhub-agent"]
