package server

import (
	"archive/tar"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

const (
	maxUploadBytes = 1 << 30
	maxUploadFiles = 10000
	maxUploadTime  = time.Hour
	// maxArchiveSlack: tar headers, pax records and padding on top of the
	// files' bytes that a TAR upload may carry.
	maxArchiveSlack = 64 << 20
	// maxTarEntries bounds directory and pax-global entries besides files.
	maxTarEntries = 4 * maxUploadFiles
	// maxTrackedBytes bounds what one upload holds in memory until it
	// commits: the names of its files (final and temporary), of its
	// archive's directories and of the directories it made, plus
	// trackedOverhead per entry. 10,000 files of 4096-byte paths would take
	// 80 MiB otherwise, in a container that may have 16.
	maxTrackedBytes = 16 << 20
	trackedOverhead = 256
	tempPrefix      = ".sandhub-upload-"
)

type putStream = grpc.ClientStreamingServer[execv1.PutFilesRequest, execv1.PutFilesResponse]

// upload is one PutFiles call: every file goes to a temporary name in its
// directory and is renamed into place only when the whole call succeeded,
// so a failed call leaves no file behind, nor a directory it made.
type upload struct {
	dest    string
	files   []*pendingFile
	dirs    []string
	total   int64
	cur     *pendingFile
	msgs    chan msgOrErr
	timeout <-chan time.Time
	// ended: the caller's stream ended (half-close or error), nothing more comes.
	ended bool
	// made: directories this upload created, removed again if it fails.
	made []string
	// tracked: bytes held for files, dirs and made (maxTrackedBytes).
	tracked int64
}

// track counts what an entry of files, dirs or made holds in memory.
func (up *upload) track(paths ...string) error {
	up.tracked += trackedOverhead
	for _, p := range paths {
		up.tracked += int64(len(p))
	}
	if up.tracked > maxTrackedBytes {
		return payloadTooLarge(fmt.Sprintf("the upload names too many files and directories (their paths take more than %d bytes); "+
			"split it, or send a TAR with shorter paths", maxTrackedBytes), fmt.Sprint(maxTrackedBytes))
	}
	return nil
}

type pendingFile struct {
	final, temp string
	f           *os.File
	sum         [32]byte
	h           interface {
		Write([]byte) (int, error)
		Sum([]byte) []byte
	}
	declared int64
	size     int64
	mode     os.FileMode
}

type msgOrErr struct {
	m   *execv1.PutFilesRequest
	err error
}

// PutFiles receives files (RAW) or one archive (TAR).
func (s *Server) PutFiles(stream putStream) error {
	up := &upload{msgs: make(chan msgOrErr, 1)}
	timer := time.NewTimer(maxUploadTime)
	defer timer.Stop()
	up.timeout = timer.C
	stop := make(chan struct{})
	defer close(stop)
	go func() { // Recv in its own goroutine so the hour limit holds on a silent caller
		for {
			m, err := stream.Recv()
			select {
			case up.msgs <- msgOrErr{m, err}:
			case <-stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	defer up.abort()
	err := s.putFiles(stream, up)
	if err != nil {
		up.abort()
		up.drain(putDrainMax)
	}
	return err
}

// putDrainMax bounds how long a failed upload still reads (and drops) what
// the caller sends before the error ends the call. Ending it while the
// caller still writes loses the status on some clients: grpc-go resets the
// stream, and a Python grpc.aio client whose write then fails reports
// INTERNAL instead of the status (grpc/grpc#36066) — the Hub's relay is one.
const putDrainMax = 2 * time.Second

// drain reads until the caller's half-close (or error), at most max.
func (up *upload) drain(max time.Duration) {
	if up.ended {
		return
	}
	t := time.NewTimer(max)
	defer t.Stop()
	for {
		select {
		case m := <-up.msgs:
			if m.err != nil {
				return
			}
		case <-t.C:
			return
		}
	}
}

func (s *Server) putFiles(stream putStream, up *upload) error {
	first, err := up.next()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return invalidStream("the first message must be start")
		}
		return err
	}
	start := first.GetStart()
	if start == nil {
		return invalidStream("the first message must be start")
	}
	if err := s.checkContainer(start.ContainerId); err != nil {
		return err
	}
	dest := start.Destination
	if dest == "" {
		dest = s.cfg.WorkDir
	}
	if up.dest, err = resolvePath(dest, s.cfg.WorkDir); err != nil {
		return err
	}
	if err := up.mkdirs(up.dest); err != nil {
		return err
	}
	switch start.Format {
	case execv1.ArchiveFormat_ARCHIVE_FORMAT_UNSPECIFIED, execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW:
		err = up.raw()
	case execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR:
		err = up.tar()
	default:
		err = invalidField("start.format", "is not an ArchiveFormat")
	}
	if err != nil {
		return err
	}
	resp, err := up.commit()
	if err != nil {
		return err
	}
	return stream.SendAndClose(resp)
}

// next returns the next message; io.EOF at the caller's half-close.
func (up *upload) next() (*execv1.PutFilesRequest, error) {
	select {
	case m := <-up.msgs:
		up.ended = m.err != nil
		return m.m, m.err
	case <-up.timeout:
		return nil, timeoutErr("the upload took longer than an hour; nothing was written")
	}
}

func (up *upload) raw() error {
	for {
		m, err := up.next()
		if errors.Is(err, io.EOF) {
			return up.finishFile()
		}
		if err != nil {
			return err
		}
		switch msg := m.Msg.(type) {
		case *execv1.PutFilesRequest_File:
			if err := up.finishFile(); err != nil {
				return err
			}
			h := msg.File
			if h.Mode > 0o1777 {
				return invalidField("file.mode", "permission bits must be 0-01777")
			}
			path, err := resolvePath(h.Path, up.dest)
			if err != nil {
				return err
			}
			if err := up.begin(path, h.Mode, h.Size); err != nil {
				return err
			}
		case *execv1.PutFilesRequest_Data:
			if up.cur == nil {
				return invalidStream("data before any file header in a RAW upload")
			}
			if err := up.write(msg.Data); err != nil {
				return err
			}
		case *execv1.PutFilesRequest_Start:
			return invalidStream("start may only be the first message")
		default:
			return invalidStream("an empty message: set file or data")
		}
	}
}

// begin opens the next file's temporary name. size > 0 is the declared size.
func (up *upload) begin(path string, mode uint32, size int64) error {
	if len(up.files) >= maxUploadFiles {
		return payloadTooLarge(fmt.Sprintf("more than %d files in one upload", maxUploadFiles), fmt.Sprintf("%d files", maxUploadFiles))
	}
	if size > 0 && up.total+size > maxUploadBytes {
		return payloadTooLarge("the upload is larger than 1 GiB", fmt.Sprintf("%d bytes", maxUploadBytes))
	}
	// Lstat: a symlink at the target is replaced by the file, never followed.
	if st, err := os.Lstat(path); err == nil && st.IsDir() {
		return pathNotAllowed(path, "a directory is in the way: "+path)
	}
	dir := filepath.Dir(path)
	if err := up.mkdirs(dir); err != nil {
		return err
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	temp := filepath.Join(dir, tempPrefix+hex.EncodeToString(rnd[:]))
	if err := up.track(path, temp); err != nil {
		return err
	}
	f, err := os.OpenFile(temp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fsErr(path, err)
	}
	if mode == 0 {
		mode = 0o644
	}
	up.cur = &pendingFile{final: path, temp: temp, f: f, h: sha256.New(), declared: size, mode: os.FileMode(mode & 0o777)}
	if mode&0o1000 != 0 {
		up.cur.mode |= os.ModeSticky
	}
	up.files = append(up.files, up.cur)
	return nil
}

func (up *upload) write(b []byte) error {
	c := up.cur
	if up.total+int64(len(b)) > maxUploadBytes {
		return payloadTooLarge("the upload is larger than 1 GiB", fmt.Sprintf("%d bytes", maxUploadBytes))
	}
	if c.declared > 0 && c.size+int64(len(b)) > c.declared {
		return invalidStream(fmt.Sprintf("%s: more bytes than its header's size %d", c.final, c.declared))
	}
	if _, err := c.f.Write(b); err != nil {
		return fsErr(c.final, err)
	}
	_, _ = c.h.Write(b)
	c.size += int64(len(b))
	up.total += int64(len(b))
	return nil
}

// finishFile closes the current file (its bytes are complete).
func (up *upload) finishFile() error {
	c := up.cur
	if c == nil {
		return nil
	}
	up.cur = nil
	if c.declared > 0 && c.size != c.declared {
		return invalidStream(fmt.Sprintf("%s: %d bytes sent, its header said %d", c.final, c.size, c.declared))
	}
	copy(c.sum[:], c.h.Sum(nil))
	c.h = nil // its state is not needed any more
	if err := c.f.Chmod(c.mode); err != nil {
		return fsErr(c.final, err)
	}
	err := c.f.Close()
	c.f = nil
	if err != nil {
		return fsErr(c.final, err)
	}
	return nil
}

// commit renames every file into place, in order (a later file of the same
// path wins), and creates the archive's directories.
func (up *upload) commit() (*execv1.PutFilesResponse, error) {
	for _, d := range up.dirs {
		if err := up.mkdirs(d); err != nil {
			return nil, err
		}
	}
	resp := &execv1.PutFilesResponse{}
	for i, f := range up.files {
		if err := os.Rename(f.temp, f.final); err != nil {
			up.files = up.files[i:] // abort removes what was not renamed
			return nil, fsErr(f.final, err)
		}
		resp.Files = append(resp.Files, &execv1.FileInfo{
			Path: f.final, Size: f.size, Mode: uint32(f.mode.Perm()) | stickyBit(f.mode), Sha256: hex.EncodeToString(f.sum[:]),
		})
		resp.TotalBytes += f.size
	}
	up.files = nil
	up.made = nil // they hold the files now
	return resp, nil
}

func stickyBit(m os.FileMode) uint32 {
	if m&os.ModeSticky != 0 {
		return 0o1000
	}
	return 0
}

// abort removes every temporary file of a failed upload, then the
// directories it made (deepest first; one something else put a file in
// meanwhile is not empty and stays).
func (up *upload) abort() {
	for _, f := range up.files {
		if f.f != nil {
			_ = f.f.Close()
		}
		_ = os.Remove(f.temp)
	}
	up.files = nil
	for i := len(up.made) - 1; i >= 0; i-- {
		_ = os.Remove(up.made[i])
	}
	up.made = nil
}

// mkdirs makes dir and its missing parents, noting each one it made.
func (up *upload) mkdirs(dir string) error {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil || d == filepath.Dir(d) {
			break
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fsErr(missing[i], err)
		} else if err == nil {
			up.made = append(up.made, missing[i])
			if err := up.track(missing[i]); err != nil {
				return err
			}
		}
	}
	// What exists must be a directory (or lead to one): MkdirAll says which is not.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fsErr(dir, err)
	}
	return nil
}

// fsErr maps a filesystem error on path: a full disk is PAYLOAD_TOO_LARGE,
// anything else the container refuses is PATH_NOT_ALLOWED.
func fsErr(path string, err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) {
		switch errno {
		case unix.ENOSPC, unix.EDQUOT:
			limit := "disk"
			var st unix.Statfs_t
			if unix.Statfs(filepath.Dir(path), &st) == nil {
				limit = fmt.Sprintf("%d bytes", st.Blocks*uint64(st.Bsize))
			}
			return payloadTooLarge("the container's disk is full; nothing of this upload was kept", limit)
		case unix.ENOENT:
			return pathNotFound(path)
		}
		return pathNotAllowed(path, fmt.Sprintf("%s: %s", path, errno.Error()))
	}
	return internal("writing the file failed")
}

// archiveReader feeds the tar reader from the data messages, bounded.
type archiveReader struct {
	up   *upload
	buf  []byte
	read int64
	err  error
}

func (a *archiveReader) Read(p []byte) (int, error) {
	for len(a.buf) == 0 {
		if a.err != nil {
			return 0, a.err
		}
		m, err := a.up.next()
		if err != nil {
			a.err = err
			return 0, err
		}
		d, ok := m.Msg.(*execv1.PutFilesRequest_Data)
		if !ok {
			a.err = invalidStream("a TAR upload carries only data messages after start")
			return 0, a.err
		}
		a.read += int64(len(d.Data))
		if a.read > maxUploadBytes+maxArchiveSlack {
			a.err = payloadTooLarge("the archive is larger than 1 GiB", fmt.Sprintf("%d bytes", maxUploadBytes))
			return 0, a.err
		}
		a.buf = d.Data
	}
	n := copy(p, a.buf)
	a.buf = a.buf[n:]
	return n, nil
}

// tar extracts one archive: regular files and directories only. Links,
// devices, fifos and sparse files fail the whole upload: an archive must not
// plant a symlink a later upload would follow, nor expand a few KiB into
// gigabytes. Go's archive/tar caps pax records and GNU long names at 1 MiB
// each before buffering them, and a name longer than 4096 bytes is refused
// by the path rules.
func (up *upload) tar() error {
	ar := &archiveReader{up: up}
	tr := tar.NewReader(ar)
	entries := 0
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return tarErr(ar, err)
		}
		if entries++; entries > maxTarEntries {
			return payloadTooLarge("the archive has too many entries", fmt.Sprintf("%d entries", maxTarEntries))
		}
		if h.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		name := strings.TrimLeft(h.Name, "/")
		if name == "" {
			name = "."
		}
		path, err := resolvePath(name, up.dest)
		if err != nil {
			return err
		}
		switch {
		case h.Typeflag == tar.TypeDir:
			if err := up.track(path); err != nil {
				return err
			}
			up.dirs = append(up.dirs, path)
		case (h.Typeflag == tar.TypeReg || h.Typeflag == tar.TypeRegA) && !isSparse(h):
			if err := up.begin(path, uint32(h.Mode)&0o1777, h.Size); err != nil {
				return err
			}
			if _, err := io.Copy(writerFunc(up.write), tr); err != nil {
				return tarErr(ar, err)
			}
			if err := up.finishFile(); err != nil {
				return err
			}
		default:
			return pathNotAllowed(path, fmt.Sprintf("%s is %s: only regular files and directories are taken from an archive "+
				"(links, devices, fifos and sparse files are refused)", h.Name, memberKind(h)))
		}
	}
	// Whatever follows the end-of-archive blocks (padding) is read and dropped.
	if _, err := io.Copy(io.Discard, ar); err != nil && !errors.Is(err, io.EOF) {
		return tarErr(ar, err)
	}
	return nil
}

func isSparse(h *tar.Header) bool {
	if h.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// tarErr: our own errors (limits, stream, timeouts) pass through; the
// archive's are INVALID_ARGUMENT on field "data".
func tarErr(ar *archiveReader, err error) error {
	if ar.err != nil && !errors.Is(ar.err, io.EOF) {
		return ar.err
	}
	if _, ok := statusOf(err); ok {
		return err
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return invalidField("data", "the archive ends early (truncated)")
	}
	return invalidField("data", "is not a valid tar archive: "+err.Error())
}

type writerFunc func([]byte) error

func (w writerFunc) Write(p []byte) (int, error) {
	if err := w(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// memberKind names what a refused tar member is, for the caller's message.
func memberKind(h *tar.Header) string {
	switch {
	case h.Typeflag == tar.TypeSymlink:
		return "a symbolic link"
	case h.Typeflag == tar.TypeLink:
		return "a hard link"
	case h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock:
		return "a device"
	case h.Typeflag == tar.TypeFifo:
		return "a fifo"
	case isSparse(h) || h.Typeflag == tar.TypeGNUSparse:
		return "a sparse file"
	}
	return fmt.Sprintf("of tar type %q", h.Typeflag)
}
