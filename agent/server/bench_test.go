package server

import (
	"testing"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
)

// BenchmarkRunTrue: one Run of `true` through a real server on a unix socket
// (go test -bench RunTrue ./agent/server/). A figure, never an assertion.
func BenchmarkRunTrue(b *testing.B) {
	a := newAgent(b)
	ctx := authed(b)
	req := &execv1.RunRequest{ContainerId: testContainer, Command: &execv1.Command{Argv: []string{"/bin/true"}}}
	b.ResetTimer()
	for b.Loop() {
		if _, err := a.client.Run(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}
