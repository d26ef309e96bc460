# Generated package: do not edit; run `make gen`.
