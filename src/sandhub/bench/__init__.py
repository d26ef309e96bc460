"""`sandhub bench`: the original measurements (container creation time, `ls /`,
time to a first HTTP 200, memory per idle container) as a command, against the
Hub or the floor (the same sandboxes created directly, without gRPC)."""
