package server

import (
	"archive/tar"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// downloadChunk is the largest data message of GetFiles (the contract's 1 MiB).
const downloadChunk = 1 << 20

type getStream = grpc.ServerStreamingServer[execv1.GetFilesResponse]

// GetFiles sends a file's bytes, or a file or directory as a tar stream.
func (s *Server) GetFiles(req *execv1.GetFilesRequest, stream getStream) error {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return err
	}
	path, err := resolvePath(req.Path, s.cfg.WorkDir)
	if err != nil {
		return err
	}
	// Everything is decided on what was opened, never on an earlier stat of
	// the path: a tenant's process may swap the file for a FIFO or a device
	// at any moment. A final symlink is followed (a path's symlinks lead
	// only where a command could go anyway); what it leads to must still
	// be a regular file or a directory.
	f, st, err := openChecked(path, true)
	if errors.Is(err, errNotFileOrDir) {
		return pathNotAllowed(path, path+" is not a regular file or a directory")
	}
	if err != nil {
		return fsErr(path, err)
	}
	defer f.Close()
	format := req.Format
	switch format {
	case execv1.ArchiveFormat_ARCHIVE_FORMAT_UNSPECIFIED:
		format = execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW
		if st.IsDir() {
			format = execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR
		}
	case execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW:
		if st.IsDir() {
			return invalidField("format", "a directory can only be downloaded as TAR")
		}
	case execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR:
	default:
		return invalidField("format", "is not an ArchiveFormat")
	}
	out := &chunker{stream: stream, buf: make([]byte, 0, downloadChunk)}
	if format == execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW {
		if err := stream.Send(&execv1.GetFilesResponse{Msg: &execv1.GetFilesResponse_Info{Info: &execv1.FileInfo{
			Path: path, Size: st.Size(), Mode: uint32(st.Mode().Perm()),
		}}}); err != nil {
			return err
		}
		// Exactly the size announced: a file that grows is cut there, one
		// that shrinks fails the call (retry).
		if _, err := io.CopyN(out, f, st.Size()); err != nil {
			return sendOrFsErr(path, err)
		}
		return out.flush()
	}
	if err := stream.Send(&execv1.GetFilesResponse{Msg: &execv1.GetFilesResponse_Info{Info: &execv1.FileInfo{
		Path: path, Size: -1, Mode: uint32(st.Mode().Perm()), IsDir: st.IsDir(),
	}}}); err != nil {
		return err
	}
	tw := tar.NewWriter(out)
	if st.IsDir() {
		err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(path, p)
			return addEntry(tw, p, "./"+filepath.ToSlash(rel))
		})
	} else {
		err = addFile(tw, f, st, "./"+filepath.Base(path))
	}
	if err != nil {
		return sendOrFsErr(path, err)
	}
	if err := tw.Close(); err != nil {
		return sendOrFsErr(path, err)
	}
	return out.flush()
}

var errNotFileOrDir = errors.New("not a regular file or a directory")

// openChecked opens path without blocking (a FIFO's open waits for a writer
// otherwise) and without taking a terminal as controlling tty, then checks
// what it got: a regular file or a directory, else errNotFileOrDir.
// follow=false refuses a final symlink (ELOOP).
func openChecked(path string, follow bool) (*os.File, fs.FileInfo, error) {
	flags := unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC
	if !follow {
		flags |= unix.O_NOFOLLOW
	}
	fd, err := unix.Open(path, flags, 0)
	if err != nil {
		return nil, nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	st, err := f.Stat() // fstat: what was opened, whatever the path says now
	if err == nil && !st.IsDir() && !st.Mode().IsRegular() {
		err = errNotFileOrDir
	}
	if err != nil {
		_ = f.Close()
		return nil, nil, err
	}
	return f, st, nil
}

// addEntry writes one tar entry: directories, regular files and symlinks
// (as links); sockets, fifos and devices are left out. A regular file is
// opened without following a symlink and checked again on the open fd: one
// swapped for anything else since the walk saw it is left out too, as if
// the walk had come by later.
func addEntry(tw *tar.Writer, path, name string) error {
	st, err := os.Lstat(path)
	if err != nil {
		return err
	}
	link := ""
	switch {
	case st.Mode()&os.ModeSymlink != 0:
		if link, err = os.Readlink(path); err != nil {
			return err
		}
	case st.IsDir():
		if name != "./." {
			name += "/"
		} else {
			name = "./"
		}
	case st.Mode().IsRegular():
		f, fst, err := openChecked(path, false)
		if errors.Is(err, errNotFileOrDir) || errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENXIO) {
			return nil // no longer a regular file: a FIFO, a symlink, a socket...
		}
		if err != nil {
			return err
		}
		defer f.Close()
		if !fst.Mode().IsRegular() {
			return nil // a directory now
		}
		return addFile(tw, f, fst, name)
	default:
		return nil
	}
	return writeHeader(tw, st, link, name)
}

// addFile writes an opened regular file: exactly its fstat size (one that
// grows is cut there, one that shrinks fails the call).
func addFile(tw *tar.Writer, f *os.File, st fs.FileInfo, name string) error {
	if err := writeHeader(tw, st, "", name); err != nil {
		return err
	}
	_, err := io.CopyN(tw, f, st.Size())
	return err
}

func writeHeader(tw *tar.Writer, st fs.FileInfo, link, name string) error {
	h, err := tar.FileInfoHeader(st, link)
	if err != nil {
		return err
	}
	h.Name, h.Uname, h.Gname = name, "", ""
	h.Format = tar.FormatPAX
	return tw.WriteHeader(h)
}

// sendOrFsErr passes a failed Send through and maps a filesystem error.
func sendOrFsErr(path string, err error) error {
	if _, ok := statusOf(err); ok {
		return err
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fsErr(pe.Path, err)
	}
	if errors.Is(err, io.EOF) {
		return unavailable(path + " changed while it was read; retry")
	}
	return fsErr(path, err)
}

// chunker turns writes into data messages of up to downloadChunk bytes.
type chunker struct {
	stream getStream
	buf    []byte
}

func (c *chunker) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		k := min(len(p), downloadChunk-len(c.buf))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
		if len(c.buf) == downloadChunk {
			if err := c.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (c *chunker) flush() error {
	if len(c.buf) == 0 {
		return nil
	}
	err := c.stream.Send(&execv1.GetFilesResponse{Msg: &execv1.GetFilesResponse_Data{Data: c.buf}})
	c.buf = make([]byte, 0, downloadChunk)
	return err
}
