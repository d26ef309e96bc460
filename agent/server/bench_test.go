package server

import (
	"io"
	"os"
	"path/filepath"
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

// BenchmarkPutFiles: one 64 MiB file in 1 MiB messages, a Go client over the
// unix socket (the agent's own ceiling, without the Hub).
func BenchmarkPutFiles(b *testing.B) {
	a := newAgent(b)
	ctx := authed(b)
	chunk := make([]byte, 1<<20)
	const n = 64
	b.SetBytes(n << 20)
	for b.Loop() {
		s, err := a.client.PutFiles(ctx)
		if err != nil {
			b.Fatal(err)
		}
		msgs := []*execv1.PutFilesRequest{
			{Msg: &execv1.PutFilesRequest_Start{Start: &execv1.PutFilesStart{ContainerId: testContainer, Destination: "up"}}},
			{Msg: &execv1.PutFilesRequest_File{File: &execv1.FileHeader{Path: "big.bin", Size: n << 20}}},
		}
		for _, m := range msgs {
			if err := s.Send(m); err != nil {
				b.Fatal(err)
			}
		}
		for range n {
			if err := s.Send(&execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_Data{Data: chunk}}); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := s.CloseAndRecv(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGetFiles: the same file back, raw.
func BenchmarkGetFiles(b *testing.B) {
	a := newAgent(b)
	ctx := authed(b)
	if err := os.MkdirAll(a.cfg.WorkDir, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(a.cfg.WorkDir, "big.bin"), make([]byte, 64<<20), 0o644); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(64 << 20)
	for b.Loop() {
		s, err := a.client.GetFiles(ctx, &execv1.GetFilesRequest{ContainerId: testContainer, Path: "big.bin"})
		if err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := s.Recv(); err == io.EOF {
				break
			} else if err != nil {
				b.Fatal(err)
			}
		}
	}
}
