"""The Kubernetes backend: a container is a hardened Pod (EKS Fargate profile,
EC2 node group or any conformant cluster), its state in labels and annotations."""
