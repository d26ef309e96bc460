package server

import (
	"archive/tar"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
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
	st, err := os.Stat(path)
	if err != nil {
		return fsErr(path, err)
	}
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
	if !st.IsDir() && !st.Mode().IsRegular() {
		return pathNotAllowed(path, path+" is not a regular file or a directory")
	}
	out := &chunker{stream: stream, buf: make([]byte, 0, downloadChunk)}
	if format == execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW {
		f, err := os.Open(path)
		if err != nil {
			return fsErr(path, err)
		}
		defer f.Close()
		if err := stream.Send(&execv1.GetFilesResponse{Msg: &execv1.GetFilesResponse_Info{Info: &execv1.FileInfo{
			Path: path, Size: st.Size(), Mode: uint32(st.Mode().Perm()),
		}}}); err != nil {
			return err
		}
		if _, err := io.Copy(out, f); err != nil {
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
		err = addEntry(tw, path, "./"+filepath.Base(path))
	}
	if err != nil {
		return sendOrFsErr(path, err)
	}
	if err := tw.Close(); err != nil {
		return sendOrFsErr(path, err)
	}
	return out.flush()
}

// addEntry writes one tar entry: directories, regular files and symlinks
// (as links); sockets, fifos and devices are left out.
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
	case !st.Mode().IsRegular():
		return nil
	}
	h, err := tar.FileInfoHeader(st, link)
	if err != nil {
		return err
	}
	h.Name, h.Uname, h.Gname = name, "", ""
	h.Format = tar.FormatPAX
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	// A file that grows while it is read is sent at its size when listed.
	_, err = io.CopyN(tw, f, st.Size())
	return err
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
