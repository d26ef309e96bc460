package server

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

func put(t *testing.T, a *agent, msgs ...*execv1.PutFilesRequest) (*execv1.PutFilesResponse, error) {
	t.Helper()
	s, err := a.client.PutFiles(authed(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if err := s.Send(m); err != nil {
			break // the server ended the call; CloseAndRecv says why
		}
	}
	return s.CloseAndRecv()
}

func start(dest string, f execv1.ArchiveFormat) *execv1.PutFilesRequest {
	return &execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_Start{Start: &execv1.PutFilesStart{
		ContainerId: testContainer, Destination: dest, Format: f}}}
}
func header(p string, mode uint32, size int64) *execv1.PutFilesRequest {
	return &execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_File{File: &execv1.FileHeader{Path: p, Mode: mode, Size: size}}}
}
func data(b []byte) *execv1.PutFilesRequest {
	return &execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_Data{Data: b}}
}

func hexsum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func TestPutRawFiles(t *testing.T) {
	a := newAgent(t)
	big := bytes.Repeat([]byte("0123456789"), 300000)
	resp, err := put(t, a, start("", 0), header("a.txt", 0o600, 5), data([]byte("hello")),
		header("sub/dir/big.bin", 0, -1), data(big[:1<<20]), data(big[1<<20:]))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Files) != 2 || resp.TotalBytes != int64(5+len(big)) {
		t.Fatalf("resp %v", resp)
	}
	f0 := resp.Files[0]
	if f0.Path != filepath.Join(a.cfg.WorkDir, "a.txt") || f0.Mode != 0o600 || f0.Sha256 != hexsum([]byte("hello")) || f0.Size != 5 {
		t.Fatalf("file 0 %v", f0)
	}
	if resp.Files[1].Sha256 != hexsum(big) || resp.Files[1].Mode != 0o644 {
		t.Fatalf("file 1 %v", resp.Files[1])
	}
	got, _ := os.ReadFile(filepath.Join(a.cfg.WorkDir, "sub/dir/big.bin"))
	if !bytes.Equal(got, big) {
		t.Fatal("content differs")
	}
	st, _ := os.Stat(filepath.Join(a.cfg.WorkDir, "a.txt"))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
}

// A failing call leaves none of its files, not even the complete ones.
func TestPutAllOrNothing(t *testing.T) {
	a := newAgent(t)
	dest := filepath.Join(t.TempDir(), "d")
	_, err := put(t, a, start(dest, 0), header("first.txt", 0, 0), data([]byte("x")), header("../escape", 0, 0))
	wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", map[string]string{"path": "../escape"})
	_, err = put(t, a, start(dest, 0), header("first.txt", 0, 3), data([]byte("x")), header("second", 0, 0))
	wantErr(t, err, codes.InvalidArgument, "INVALID_STREAM", nil)
	entries, _ := os.ReadDir(dest)
	if len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}
}

func TestPutPathRulesAndStreamOrder(t *testing.T) {
	a := newAgent(t)
	for _, p := range []string{"/proc/x", "/sys/kernel/x", "/dev/null", "a/../../b", strings.Repeat("a", 4097)} {
		_, err := put(t, a, start("", 0), header(p, 0, 0))
		wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", map[string]string{"path": "*"})
	}
	_, err := put(t, a, start("", 0), data([]byte("x")))
	wantErr(t, err, codes.InvalidArgument, "INVALID_STREAM", nil)
	_, err = put(t, a, header("x", 0, 0))
	wantErr(t, err, codes.InvalidArgument, "INVALID_STREAM", nil)
	_, err = put(t, a, start("", 0), start("", 0))
	wantErr(t, err, codes.InvalidArgument, "INVALID_STREAM", nil)
	_, err = put(t, a, start("", 0), header("x", 0, 2<<30))
	wantErr(t, err, codes.ResourceExhausted, "PAYLOAD_TOO_LARGE", map[string]string{"limit": "*"})
	_, err = put(t, a, start("", execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR), header("x", 0, 0))
	wantErr(t, err, codes.InvalidArgument, "INVALID_STREAM", nil)
}

type entry struct {
	h    tar.Header
	body string
}

func mkTar(t *testing.T, es ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range es {
		h := e.h
		if h.Typeflag == tar.TypeReg || h.Typeflag == 0 {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func putTar(t *testing.T, a *agent, dest string, archive []byte) (*execv1.PutFilesResponse, error) {
	msgs := []*execv1.PutFilesRequest{start(dest, execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR)}
	for len(archive) > 0 { // odd chunk sizes: headers straddle messages
		n := min(len(archive), 777)
		msgs = append(msgs, data(archive[:n]))
		archive = archive[n:]
	}
	return put(t, a, msgs...)
}

func TestPutTar(t *testing.T) {
	a := newAgent(t)
	dest := filepath.Join(t.TempDir(), "t")
	archive := mkTar(t,
		entry{h: tar.Header{Name: "dir/", Typeflag: tar.TypeDir, Mode: 0o755}},
		entry{h: tar.Header{Name: "dir/a.txt", Typeflag: tar.TypeReg, Mode: 0o640}, body: "aaa"},
		entry{h: tar.Header{Name: "/abs.txt", Typeflag: tar.TypeReg, Mode: 0o644}, body: "abs"},
		entry{h: tar.Header{Name: "empty/", Typeflag: tar.TypeDir, Mode: 0o755}},
		entry{h: tar.Header{Name: "long/" + strings.Repeat("n", 200), Typeflag: tar.TypeReg, Mode: 0o644,
			PAXRecords: map[string]string{"comment": "pax"}}, body: "long"},
	)
	resp, err := putTar(t, a, dest, archive)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Files) != 3 || resp.TotalBytes != 10 || resp.Files[0].Mode != 0o640 || resp.Files[0].Sha256 != hexsum([]byte("aaa")) {
		t.Fatalf("resp %v", resp)
	}
	for p, want := range map[string]string{"dir/a.txt": "aaa", "abs.txt": "abs", "long/" + strings.Repeat("n", 200): "long"} {
		if got, _ := os.ReadFile(filepath.Join(dest, p)); string(got) != want {
			t.Fatalf("%s: %q", p, got)
		}
	}
	if st, err := os.Stat(filepath.Join(dest, "empty")); err != nil || !st.IsDir() {
		t.Fatal("directory entry not created")
	}
}

func TestPutHostileTars(t *testing.T) {
	a := newAgent(t)
	ok := entry{h: tar.Header{Name: "ok.txt", Typeflag: tar.TypeReg, Mode: 0o644}, body: "ok"}
	cases := map[string][]byte{
		"dotdot":    mkTar(t, ok, entry{h: tar.Header{Name: "../evil", Typeflag: tar.TypeReg}, body: "x"}),
		"symlink":   mkTar(t, ok, entry{h: tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}}),
		"hardlink":  mkTar(t, ok, entry{h: tar.Header{Name: "hard", Typeflag: tar.TypeLink, Linkname: "ok.txt"}}),
		"device":    mkTar(t, ok, entry{h: tar.Header{Name: "dev", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}}),
		"fifo":      mkTar(t, ok, entry{h: tar.Header{Name: "fifo", Typeflag: tar.TypeFifo}}),
		"sparse":    sparseTar(),
		"paxsparse": paxSparse(),
		"proc":      mkTar(t, entry{h: tar.Header{Name: "x", Typeflag: tar.TypeReg}, body: "x"}),
	}
	for name, archive := range cases {
		dest := filepath.Join(t.TempDir(), name)
		if name == "proc" {
			dest = "/proc/self"
		}
		_, err := putTar(t, a, dest, archive)
		wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", map[string]string{"path": "*"})
		if entries, _ := os.ReadDir(dest); len(entries) != 0 && name != "proc" {
			t.Fatalf("%s: left %v", name, entries)
		}
	}
	// More than 10,000 files in one call.
	msgs := []*execv1.PutFilesRequest{start(filepath.Join(t.TempDir(), "many"), 0)}
	for i := range 10001 {
		msgs = append(msgs, header(fmt.Sprintf("f%d", i), 0, 0))
	}
	_, err := put(t, a, msgs...)
	wantErr(t, err, codes.ResourceExhausted, "PAYLOAD_TOO_LARGE", map[string]string{"limit": "10000 files"})
	if entries, _ := os.ReadDir(filepath.Join(filepath.Dir(msgs[0].GetStart().Destination), "many")); len(entries) != 0 {
		t.Fatalf("left %d files", len(entries))
	}
	// A pax header larger than archive/tar's 1 MiB bound is refused before it is buffered.
	dest := filepath.Join(t.TempDir(), "pax")
	_, err = putTar(t, a, dest, hugePax())
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "data"})
	// Garbage and a cut-off archive.
	_, err = putTar(t, a, dest, bytes.Repeat([]byte{'x'}, 1024))
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "data"})
	good := mkTar(t, entry{h: tar.Header{Name: "f", Typeflag: tar.TypeReg}, body: strings.Repeat("y", 5000)})
	_, err = putTar(t, a, dest, good[:2048])
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "data"})
	if entries, _ := os.ReadDir(dest); len(entries) != 0 {
		t.Fatalf("left %v", entries)
	}
}

// rawHeader is a ustar header block with any type flag and size.
func rawHeader(name string, typeflag byte, size int64, extra func(blk []byte)) []byte {
	blk := make([]byte, 512)
	copy(blk, name)
	copy(blk[100:], "0000644\x00")
	copy(blk[108:], "0000000\x00")
	copy(blk[116:], "0000000\x00")
	copy(blk[124:], fmt.Sprintf("%011o\x00", size))
	copy(blk[136:], "00000000000\x00")
	blk[156] = typeflag
	copy(blk[257:], "ustar\x0000")
	if extra != nil {
		extra(blk)
	}
	copy(blk[148:156], "        ")
	sum := 0
	for _, b := range blk {
		sum += int(b)
	}
	copy(blk[148:], fmt.Sprintf("%06o\x00 ", sum))
	return blk
}

func pad(b []byte) []byte { return append(b, make([]byte, (512-len(b)%512)%512)...) }

// sparseTar is an old-GNU sparse member ('S'): 512 bytes stored, 1 GiB claimed.
func sparseTar() []byte {
	h := rawHeader("sparse.bin", 'S', 512, func(blk []byte) {
		copy(blk[257:], "ustar  \x00")
		copy(blk[386:], "00000000000\x00") // sparse map: offset 0,
		copy(blk[398:], "00000001000\x00") // 512 bytes,
		copy(blk[483:], "10000000000\x00") // real size 1 GiB
	})
	out := append(h, make([]byte, 512)...)
	return append(out, make([]byte, 1024)...)
}

// paxRecord formats one pax record ("<len> key=value\n", len counting itself).
func paxRecord(kv string) string {
	n := len(kv) + 3
	for len(fmt.Sprintf("%d %s\n", n, kv)) != n {
		n++
	}
	return fmt.Sprintf("%d %s\n", n, kv)
}

// paxSparse is a PAX 1.0 sparse member: one stored byte claims 1 GiB.
func paxSparse() []byte {
	recs := paxRecord("GNU.sparse.major=1") + paxRecord("GNU.sparse.minor=0") +
		paxRecord("GNU.sparse.name=s") + paxRecord("GNU.sparse.realsize=1073741824")
	out := append(rawHeader("PaxHeaders/s", 'x', int64(len(recs)), nil), pad([]byte(recs))...)
	out = append(out, rawHeader("s", '0', 1024, nil)...)
	out = append(out, pad([]byte("1\n1073741823\n1\n"))...) // map: 1 entry at the end
	out = append(out, pad([]byte("x"))...)
	return append(out, make([]byte, 1024)...)
}

// hugePax is a pax extended header ('x') of 2 MiB before a 1-byte file.
func hugePax() []byte {
	rec := "comment=" + strings.Repeat("c", 2<<20) + "\n"
	n := len(rec) + 8
	rec = fmt.Sprintf("%d %s", n, rec)
	out := append(rawHeader("PaxHeaders/p", 'x', int64(len(rec)), nil), pad([]byte(rec))...)
	out = append(out, rawHeader("p", '0', 1, nil)...)
	out = append(out, pad([]byte("x"))...)
	return append(out, make([]byte, 1024)...)
}

func get(t *testing.T, a *agent, req *execv1.GetFilesRequest) (*execv1.FileInfo, []byte, error) {
	t.Helper()
	req.ContainerId = testContainer
	s, err := a.client.GetFiles(authed(t), req)
	if err != nil {
		t.Fatal(err)
	}
	var info *execv1.FileInfo
	var body []byte
	for {
		m, err := s.Recv()
		if err == io.EOF {
			return info, body, nil
		}
		if err != nil {
			return nil, nil, err
		}
		if i := m.GetInfo(); i != nil {
			info = i
		} else {
			if len(m.GetData()) > 1<<20 {
				t.Fatalf("chunk of %d bytes", len(m.GetData()))
			}
			body = append(body, m.GetData()...)
		}
	}
}

func TestGetFiles(t *testing.T) {
	a := newAgent(t)
	dir := filepath.Join(t.TempDir(), "g")
	big := bytes.Repeat([]byte("z"), 3<<20+5)
	_ = os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	_ = os.WriteFile(filepath.Join(dir, "big"), big, 0o640)
	_ = os.WriteFile(filepath.Join(dir, "sub", "s.txt"), []byte("s"), 0o644)
	_ = os.Symlink("big", filepath.Join(dir, "link"))

	info, body, err := get(t, a, &execv1.GetFilesRequest{Path: filepath.Join(dir, "big")})
	if err != nil || info.Size != int64(len(big)) || info.IsDir || info.Mode != 0o640 || !bytes.Equal(body, big) {
		t.Fatalf("raw: %v %v %d", err, info, len(body))
	}
	info, body, err = get(t, a, &execv1.GetFilesRequest{Path: dir})
	if err != nil || info.Size != -1 || !info.IsDir {
		t.Fatalf("dir: %v %v", err, info)
	}
	names := map[string]string{}
	tr := tar.NewReader(bytes.NewReader(body))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		names[h.Name] = string(b)
		if h.Typeflag == tar.TypeSymlink {
			names[h.Name] = "->" + h.Linkname
		}
	}
	if names["./sub/s.txt"] != "s" || len(names["./big"]) != len(big) || names["./link"] != "->big" {
		t.Fatalf("tar entries %v", len(names))
	}
	if _, ok := names["./sub/"]; !ok {
		t.Fatalf("no directory entry: %v", names)
	}
	info, body, err = get(t, a, &execv1.GetFilesRequest{Path: filepath.Join(dir, "sub/s.txt"), Format: execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR})
	if err != nil || info.Size != -1 {
		t.Fatalf("file as tar: %v %v", err, info)
	}
	h, _ := tar.NewReader(bytes.NewReader(body)).Next()
	if h == nil || h.Name != "./s.txt" {
		t.Fatalf("file as tar: %v", h)
	}
	_, _, err = get(t, a, &execv1.GetFilesRequest{Path: dir, Format: execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW})
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "format"})
	_, _, err = get(t, a, &execv1.GetFilesRequest{Path: filepath.Join(dir, "missing")})
	wantErr(t, err, codes.NotFound, "PATH_NOT_FOUND", map[string]string{"path": "*"})
	_, _, err = get(t, a, &execv1.GetFilesRequest{Path: "/proc/self/environ"})
	wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", map[string]string{"path": "*"})
}

// A full container disk is RESOURCE_EXHAUSTED PAYLOAD_TOO_LARGE and leaves
// nothing. ROOT-ONLY: mounts a 1 MiB tmpfs (runs in CI as root).
func TestPutDiskFull(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("ROOT-ONLY: mounts a tmpfs; runs in CI as root")
	}
	a := newAgent(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	_, err := put(t, a, start(dir, 0), header("ok", 0, 0), data([]byte("fits")),
		header("big", 0, 0), data(make([]byte, 1<<20)), data(make([]byte, 1<<20)))
	wantErr(t, err, codes.ResourceExhausted, "PAYLOAD_TOO_LARGE", map[string]string{"limit": "*"})
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("left %v", entries)
	}
}

// A refused upload does not end the call while the caller is still sending:
// it reads on (dropping) until the half-close, then sends the status, which
// a client whose write would fail on a reset stream could lose.
func TestRefusedUploadWaitsForTheHalfClose(t *testing.T) {
	a := newAgent(t)
	s, err := a.client.PutFiles(authed(t))
	if err != nil {
		t.Fatal(err)
	}
	_ = s.Send(&execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_Start{Start: &execv1.PutFilesStart{ContainerId: testContainer}}})
	_ = s.Send(&execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_File{File: &execv1.FileHeader{Path: "/proc/x"}}})
	time.Sleep(300 * time.Millisecond) // the agent has refused it by now
	for range 5 {
		if err := s.Send(&execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_Data{Data: []byte("more")}}); err != nil {
			t.Fatalf("the call ended before the caller was done sending: %v", err)
		}
	}
	_, err = s.CloseAndRecv()
	wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", nil)
}

// A failed upload leaves no directory it made; one that existed stays.
func TestFailedUploadRemovesTheDirectoriesItMade(t *testing.T) {
	a := newAgent(t)
	work := a.cfg.WorkDir
	if err := os.MkdirAll(filepath.Join(work, "old"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := put(t, a, start("", execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW),
		header("old/new/deeper/f.txt", 0o644, 1), data([]byte("x")),
		header("/proc/refused", 0o644, 1), data([]byte("x")))
	wantErr(t, err, codes.InvalidArgument, "PATH_NOT_ALLOWED", nil)
	entries, _ := os.ReadDir(filepath.Join(work, "old"))
	if len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}
}

// A symlink at the target is replaced by the file, not followed.
func TestUploadReplacesASymlinkAtTheTarget(t *testing.T) {
	a := newAgent(t)
	work := a.cfg.WorkDir
	_ = os.MkdirAll(filepath.Join(work, "dir"), 0o755)
	if err := os.Symlink(filepath.Join(work, "dir"), filepath.Join(work, "link")); err != nil {
		t.Fatal(err)
	}
	if _, err := put(t, a, start("", execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW), header("link", 0o644, 5), data([]byte("plain"))); err != nil {
		t.Fatal(err)
	}
	st, err := os.Lstat(filepath.Join(work, "link"))
	if err != nil || !st.Mode().IsRegular() {
		t.Fatalf("link is %v %v", st.Mode(), err)
	}
}

// What one upload holds in memory until it commits is bounded: an archive
// of 4,500 directory entries with ~3.8 KB paths (17 MB of names, far under
// the entry cap) is RESOURCE_EXHAUSTED, and nothing is made.
func TestPutTrackedPathsAreBounded(t *testing.T) {
	a := newAgent(t)
	dest := filepath.Join(t.TempDir(), "up")
	seg := strings.Repeat("d", 250)
	long := strings.Repeat(seg+"/", 15) // 3765 bytes
	var es []entry
	for i := range 4500 {
		es = append(es, entry{h: tar.Header{Name: fmt.Sprintf("%s%d/", long, i), Typeflag: tar.TypeDir, Mode: 0o755}})
	}
	archive := mkTar(t, es...)
	msgs := []*execv1.PutFilesRequest{start(dest, execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR)}
	for len(archive) > 0 {
		n := min(len(archive), 1<<20)
		msgs = append(msgs, data(archive[:n]))
		archive = archive[n:]
	}
	_, err := put(t, a, msgs...)
	wantErr(t, err, codes.ResourceExhausted, "PAYLOAD_TOO_LARGE", map[string]string{"limit": fmt.Sprint(maxTrackedBytes)})
	if _, err := os.Stat(dest); !os.IsNotExist(err) {
		t.Fatalf("the failed upload left %s: %v", dest, err)
	}
}
