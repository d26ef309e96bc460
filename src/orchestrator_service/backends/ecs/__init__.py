"""ECS backend: a container is an ECS task (Fargate, Fargate Spot or EC2 capacity)."""
