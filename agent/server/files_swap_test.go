package server

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// swapper keeps replacing path (atomically, by rename) with a regular file
// holding "hello", a FIFO nobody writes, and a symlink to /dev/zero, until
// stopped: a tenant's process racing a download.
func swapper(t *testing.T, path string) (stop func()) {
	var done atomic.Bool
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tmp := path + ".tmp"
		for i := 0; !done.Load(); i++ {
			_ = os.Remove(tmp)
			switch i % 3 {
			case 0:
				_ = os.WriteFile(tmp, []byte("hello"), 0o644)
			case 1:
				_ = unix.Mkfifo(tmp, 0o644)
			case 2:
				_ = os.Symlink("/dev/zero", tmp)
			}
			_ = os.Rename(tmp, path)
		}
	}()
	return func() {
		done.Store(true)
		<-finished
		// Whatever a call may still wait for (a FIFO's open) is released.
		_ = os.Remove(path)
		_ = unix.Mkfifo(path, 0o644)
		if fd, err := unix.Open(path, unix.O_RDWR|unix.O_NONBLOCK, 0); err == nil {
			_ = unix.Close(fd)
		}
	}
}

// download collects one GetFiles call, bounded in time and bytes.
func download(a *agent, req *execv1.GetFilesRequest) ([]byte, error) {
	ctx, cancel := context.WithTimeout(withToken(context.Background(), testToken), 3*time.Second)
	defer cancel()
	req.ContainerId = testContainer
	s, err := a.client.GetFiles(ctx, req)
	if err != nil {
		return nil, err
	}
	var body []byte
	for {
		m, err := s.Recv()
		if err == io.EOF {
			return body, nil
		}
		if err != nil {
			return body, err
		}
		body = append(body, m.GetData()...)
		if len(body) > 1<<20 {
			return body, status.Error(codes.OutOfRange, "more than 1 MiB for a 5-byte file")
		}
	}
}

// A file swapped for a FIFO or a device between the agent's look and its
// open never blocks the call nor streams the device: each download is the
// file, or refused, within its deadline.
func TestGetFilesSurvivesSwappedFiles(t *testing.T) {
	a := newAgent(t)
	dir := filepath.Join(t.TempDir(), "d")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "f")
	stop := swapper(t, path)
	defer stop()
	ok := 0
	for i := range 400 {
		req := &execv1.GetFilesRequest{Path: path}
		if i%2 == 1 {
			req = &execv1.GetFilesRequest{Path: dir, Format: execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR}
		}
		body, err := download(a, req)
		if err != nil {
			switch status.Code(err) {
			case codes.InvalidArgument, codes.NotFound, codes.Unavailable:
				continue // refused, gone, or changed while read
			}
			t.Fatalf("call %d (%v): %v after %d bytes", i, req.Format, err, len(body))
		}
		if req.Format == execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR {
			tr := tar.NewReader(bytes.NewReader(body))
			for {
				h, err := tr.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				b, _ := io.ReadAll(tr)
				if h.Typeflag == tar.TypeReg && h.Name == "./f" && string(b) != "hello" {
					t.Fatalf("call %d: tar entry %q holds %q", i, h.Name, b)
				}
			}
		} else if string(body) != "hello" {
			t.Fatalf("call %d: got %q", i, body[:min(len(body), 16)])
		}
		ok++
	}
	if ok == 0 {
		t.Fatal("no download succeeded")
	}
	// Directly: a FIFO and a device are refused at once.
	stop()
	_, err := download(a, &execv1.GetFilesRequest{Path: path})
	wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", map[string]string{"path": "*"})
	_ = os.Remove(path)
	_ = os.Symlink("/dev/zero", path)
	_, err = download(a, &execv1.GetFilesRequest{Path: path})
	wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", map[string]string{"path": "*"})
}
