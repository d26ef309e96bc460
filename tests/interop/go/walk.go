package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	orchestratorv1 "github.com/sandhub/sandhub/gen/go/sandhub/orchestrator/v1"
)

const (
	hello     = "hello\n"
	fromTar   = "from tar\n"
	unknownID = "cnt-000000000000"
	// The background process: output on both streams, a pause (so that
	// following really follows), and an exit code of its own.
	processShell = "echo out; echo err >&2; sleep 0.5; echo more; exit 3"
)

func (w *walk) create(ctx context.Context) (fields, error) {
	resp, err := w.containers.CreateContainer(ctx, &orchestratorv1.CreateContainerRequest{
		WaitUntilRunning: true,
		Labels:           map[string]string{"interop": "go"},
	})
	if err != nil {
		return nil, err
	}
	c := resp.GetContainer()
	w.containerID = c.GetContainerId()
	saw := fields{"container_id": c.GetContainerId(), "state": c.GetState().String(), "tenant": c.GetTenant(),
		"labels": c.GetLabels()}
	if c.GetState() != orchestratorv1.ContainerState_CONTAINER_STATE_RUNNING {
		return saw, fmt.Errorf("state %s, want RUNNING", c.GetState())
	}
	if !regexp.MustCompile(`^cnt-[a-z0-9]{12}$`).MatchString(c.GetContainerId()) {
		return saw, fmt.Errorf("container_id %q is not cnt-<12 of [a-z0-9]>", c.GetContainerId())
	}
	return saw, nil
}

// fileList is the PutFilesResponse's files as the step line shows them.
func fileList(files []*execv1.FileInfo) []fields {
	out := []fields{}
	for _, f := range files {
		out = append(out, fields{"path": f.GetPath(), "size": f.GetSize(), "sha256": f.GetSha256()})
	}
	return out
}

func (w *walk) putRaw(ctx context.Context) (fields, error) {
	stream, err := w.exec.PutFiles(ctx)
	if err != nil {
		return nil, err
	}
	for _, m := range []*execv1.PutFilesRequest{
		{Msg: &execv1.PutFilesRequest_Start{Start: &execv1.PutFilesStart{
			ContainerId: w.containerID, Format: execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW}}},
		{Msg: &execv1.PutFilesRequest_File{File: &execv1.FileHeader{Path: "hello.txt", Mode: 0o644, Size: int64(len(hello))}}},
		{Msg: &execv1.PutFilesRequest_Data{Data: []byte(hello)}},
	} {
		if err := stream.Send(m); err != nil {
			return nil, err
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	saw := fields{"files": fileList(resp.GetFiles()), "total_bytes": resp.GetTotalBytes()}
	sum := sha256.Sum256([]byte(hello))
	if len(resp.GetFiles()) != 1 || resp.GetFiles()[0].GetPath() != "/work/hello.txt" ||
		resp.GetFiles()[0].GetSha256() != hex.EncodeToString(sum[:]) || resp.GetTotalBytes() != int64(len(hello)) {
		return saw, fmt.Errorf("want /work/hello.txt, %d bytes, sha256 %x", len(hello), sum)
	}
	return saw, nil
}

func (w *walk) putTar(ctx context.Context) (fields, error) {
	var archive bytes.Buffer
	tw := tar.NewWriter(&archive)
	if err := tw.WriteHeader(&tar.Header{Name: "dir/", Typeflag: tar.TypeDir, Mode: 0o755}); err != nil {
		return nil, err
	}
	if err := tw.WriteHeader(&tar.Header{Name: "dir/a.txt", Typeflag: tar.TypeReg, Mode: 0o600, Size: int64(len(fromTar))}); err != nil {
		return nil, err
	}
	if _, err := tw.Write([]byte(fromTar)); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	stream, err := w.exec.PutFiles(ctx)
	if err != nil {
		return nil, err
	}
	for _, m := range []*execv1.PutFilesRequest{
		{Msg: &execv1.PutFilesRequest_Start{Start: &execv1.PutFilesStart{
			ContainerId: w.containerID, Destination: "unpacked", Format: execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR}}},
		{Msg: &execv1.PutFilesRequest_Data{Data: archive.Bytes()}},
	} {
		if err := stream.Send(m); err != nil {
			return nil, err
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	saw := fields{"files": fileList(resp.GetFiles()), "total_bytes": resp.GetTotalBytes()}
	if len(resp.GetFiles()) != 1 || resp.GetFiles()[0].GetPath() != "/work/unpacked/dir/a.txt" ||
		resp.GetFiles()[0].GetMode() != 0o600 {
		return saw, errors.New("want one regular file, /work/unpacked/dir/a.txt, mode 0600")
	}
	return saw, nil
}

func (w *walk) run(ctx context.Context) (fields, error) {
	resp, err := w.exec.Run(ctx, &execv1.RunRequest{ContainerId: w.containerID, Command: &execv1.Command{
		Argv: []string{"cat", "hello.txt", "unpacked/dir/a.txt"}}})
	if err != nil {
		return nil, err
	}
	saw := fields{"exit_code": resp.GetExitStatus().GetExitCode(), "stdout": string(resp.GetStdout()),
		"stderr": string(resp.GetStderr())}
	if resp.GetExitStatus().GetExitCode() != 0 || string(resp.GetStdout()) != hello+fromTar {
		return saw, fmt.Errorf("want exit 0 and %q", hello+fromTar)
	}
	return saw, nil
}

// execOutput reads an Exec stream to its end: stdout, stderr, and the exit
// status that must be its last message.
func execOutput(stream grpc.BidiStreamingClient[execv1.ExecRequest, execv1.ExecResponse],
	stdout *bytes.Buffer, until func() bool) (*execv1.ExitStatus, error) {
	for {
		m, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		switch m := m.GetMsg().(type) {
		case *execv1.ExecResponse_Stdout:
			stdout.Write(m.Stdout)
		case *execv1.ExecResponse_ExitStatus:
			if _, err := stream.Recv(); err != io.EOF {
				return m.ExitStatus, fmt.Errorf("a message or error after exit_status: %v", err)
			}
			return m.ExitStatus, nil
		}
		if until != nil && until() {
			return nil, nil
		}
	}
}

func (w *walk) startExec(ctx context.Context, start *execv1.ExecStart) (
	grpc.BidiStreamingClient[execv1.ExecRequest, execv1.ExecResponse], int32, error) {
	stream, err := w.exec.Exec(ctx)
	if err != nil {
		return nil, 0, err
	}
	if err := stream.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Start{Start: start}}); err != nil {
		return nil, 0, err
	}
	first, err := stream.Recv()
	if err != nil {
		return nil, 0, err
	}
	if first.GetStarted() == nil {
		return nil, 0, fmt.Errorf("first message %v, want started", first)
	}
	return stream, first.GetStarted().GetPid(), nil
}

// execStdinEOF: `cat` echoes stdin, and ends once the client half-closes the
// request stream (CloseSend), which closes the command's stdin.
func (w *walk) execStdinEOF(ctx context.Context) (fields, error) {
	stream, pid, err := w.startExec(ctx, &execv1.ExecStart{ContainerId: w.containerID,
		Command: &execv1.Command{Argv: []string{"cat"}}})
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("ping\n")}}); err != nil {
		return nil, err
	}
	if err := stream.CloseSend(); err != nil {
		return nil, err
	}
	var stdout bytes.Buffer
	exit, err := execOutput(stream, &stdout, nil)
	saw := fields{"pid": pid, "stdout": stdout.String(), "exit_code": exit.GetExitCode()}
	if err != nil {
		return saw, err
	}
	if stdout.String() != "ping\n" || exit.GetExitCode() != 0 {
		return saw, errors.New(`want "ping\n" and exit 0 after the half-close`)
	}
	return saw, nil
}

var sttySize = regexp.MustCompile(`(\d+) (\d+)`)

// execPty: `stty size` on the terminal asked for, then again after a resize.
func (w *walk) execPty(ctx context.Context) (fields, error) {
	stream, _, err := w.startExec(ctx, &execv1.ExecStart{ContainerId: w.containerID,
		Command: &execv1.Command{Argv: []string{"sh", "-c", "stty size; read line; stty size"}},
		Pty:     &execv1.PtySize{Rows: 24, Cols: 80}})
	if err != nil {
		return nil, err
	}
	var stdout bytes.Buffer
	if _, err := execOutput(stream, &stdout, func() bool { return strings.Contains(stdout.String(), "\n") }); err != nil {
		return fields{"output": stdout.String()}, err
	}
	for _, m := range []*execv1.ExecRequest{
		{Msg: &execv1.ExecRequest_Resize{Resize: &execv1.PtySize{Rows: 40, Cols: 120}}},
		{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("go\n")}},
	} {
		if err := stream.Send(m); err != nil {
			return nil, err
		}
	}
	exit, err := execOutput(stream, &stdout, nil)
	sizes := []string{}
	for _, m := range sttySize.FindAllString(stdout.String(), -1) {
		sizes = append(sizes, m)
	}
	saw := fields{"output": stdout.String(), "sizes": sizes, "exit_code": exit.GetExitCode()}
	if err != nil {
		return saw, err
	}
	_ = stream.CloseSend()
	if len(sizes) != 2 || sizes[0] != "24 80" || sizes[1] != "40 120" || exit.GetExitCode() != 0 {
		return saw, errors.New(`want sizes ["24 80", "40 120"] and exit 0`)
	}
	return saw, nil
}

// process: a background process, followed to its exit, then read back.
func (w *walk) process(ctx context.Context) (fields, error) {
	started, err := w.exec.StartProcess(ctx, &execv1.StartProcessRequest{ContainerId: w.containerID,
		ProcessId: "ticker", Command: &execv1.Command{Shell: processShell}})
	if err != nil {
		return nil, err
	}
	attach, err := w.exec.AttachProcess(ctx, &execv1.AttachProcessRequest{ContainerId: w.containerID,
		ProcessId: "ticker", Follow: true})
	if err != nil {
		return nil, err
	}
	var stdout, stderr bytes.Buffer
	var exit *execv1.ExitStatus
	for exit == nil {
		m, err := attach.Recv()
		if err != nil {
			return fields{"stdout": stdout.String(), "stderr": stderr.String()}, fmt.Errorf("attach: %w", err)
		}
		switch m := m.GetMsg().(type) {
		case *execv1.AttachProcessResponse_Stdout:
			stdout.Write(m.Stdout.GetData())
		case *execv1.AttachProcessResponse_Stderr:
			stderr.Write(m.Stderr.GetData())
		case *execv1.AttachProcessResponse_ExitStatus:
			exit = m.ExitStatus
		}
	}
	got, err := w.exec.GetProcess(ctx, &execv1.GetProcessRequest{ContainerId: w.containerID, ProcessId: "ticker"})
	if err != nil {
		return nil, err
	}
	p := got.GetProcess()
	saw := fields{"created": started.GetCreated(), "stdout": stdout.String(), "stderr": stderr.String(),
		"exit_code": exit.GetExitCode(), "state": p.GetState().String(), "shell": p.GetCommand().GetShell(),
		"argv": append([]string{}, p.GetCommand().GetArgv()...), "process_exit_code": p.GetExitStatus().GetExitCode()}
	switch {
	case !started.GetCreated():
		return saw, errors.New("created false for a new process id")
	case stdout.String() != "out\nmore\n" || stderr.String() != "err\n" || exit.GetExitCode() != 3:
		return saw, errors.New(`want stdout "out\nmore\n", stderr "err\n", exit 3`)
	case p.GetState() != execv1.ProcessState_PROCESS_STATE_EXITED || p.GetExitStatus().GetExitCode() != 3:
		return saw, errors.New("GetProcess: want EXITED with exit code 3")
	case p.GetCommand().GetShell() != processShell || len(p.GetCommand().GetArgv()) != 0:
		return saw, errors.New("GetProcess: want the command as asked (shell, no argv)")
	}
	return saw, nil
}

// download reads a GetFiles stream: its info, then the bytes.
func (w *walk) download(ctx context.Context, path string, format execv1.ArchiveFormat) (*execv1.FileInfo, []byte, error) {
	stream, err := w.exec.GetFiles(ctx, &execv1.GetFilesRequest{ContainerId: w.containerID, Path: path, Format: format})
	if err != nil {
		return nil, nil, err
	}
	first, err := stream.Recv()
	if err != nil {
		return nil, nil, err
	}
	if first.GetInfo() == nil {
		return nil, nil, errors.New("first message is not info")
	}
	var data bytes.Buffer
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return first.GetInfo(), data.Bytes(), nil
		}
		if err != nil {
			return first.GetInfo(), data.Bytes(), err
		}
		data.Write(m.GetData())
	}
}

func (w *walk) getRaw(ctx context.Context) (fields, error) {
	info, data, err := w.download(ctx, "hello.txt", execv1.ArchiveFormat_ARCHIVE_FORMAT_RAW)
	if err != nil {
		return nil, err
	}
	saw := fields{"path": info.GetPath(), "size": info.GetSize(), "is_dir": info.GetIsDir(), "data": string(data)}
	if info.GetPath() != "/work/hello.txt" || info.GetSize() != int64(len(hello)) || string(data) != hello {
		return saw, fmt.Errorf("want /work/hello.txt, size %d, %q", len(hello), hello)
	}
	return saw, nil
}

func (w *walk) getTar(ctx context.Context) (fields, error) {
	info, data, err := w.download(ctx, "unpacked", execv1.ArchiveFormat_ARCHIVE_FORMAT_TAR)
	if err != nil {
		return nil, err
	}
	files := map[string]string{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fields{"files": files}, fmt.Errorf("reading the tar stream: %w", err)
		}
		if h.Typeflag == tar.TypeReg {
			body, _ := io.ReadAll(tr)
			files[strings.TrimPrefix(h.Name, "./")] = string(body)
		}
	}
	saw := fields{"path": info.GetPath(), "size": info.GetSize(), "is_dir": info.GetIsDir(), "files": files}
	var found bool
	for name, body := range files {
		found = found || (strings.HasSuffix(name, "dir/a.txt") && body == fromTar)
	}
	if info.GetSize() != -1 || !info.GetIsDir() || !found {
		return saw, errors.New("want size -1, is_dir, and dir/a.txt in the archive")
	}
	return saw, nil
}

func (w *walk) errorNotFound(ctx context.Context) (fields, error) {
	var trailer metadata.MD
	_, err := w.containers.GetContainer(ctx, &orchestratorv1.GetContainerRequest{ContainerId: unknownID},
		grpc.Trailer(&trailer))
	if err == nil {
		return nil, errors.New("GetContainer of an unknown id succeeded")
	}
	saw := statusFields(err, trailer)
	return saw, expectError(saw, "NOT_FOUND", "CONTAINER_NOT_FOUND", map[string]string{"container_id": unknownID})
}

// errorProcessNotFound: an ExecService error carries the same details.
func (w *walk) errorProcessNotFound(ctx context.Context) (fields, error) {
	var trailer metadata.MD
	_, err := w.exec.GetProcess(ctx, &execv1.GetProcessRequest{ContainerId: w.containerID, ProcessId: "no-such"},
		grpc.Trailer(&trailer))
	if err == nil {
		return nil, errors.New("GetProcess of an unknown id succeeded")
	}
	saw := statusFields(err, trailer)
	return saw, expectError(saw, "NOT_FOUND", "PROCESS_NOT_FOUND",
		map[string]string{"container_id": w.containerID, "process_id": "no-such"})
}

func (w *walk) errorInvalidField(ctx context.Context) (fields, error) {
	var trailer metadata.MD
	_, err := w.containers.CreateContainer(ctx, &orchestratorv1.CreateContainerRequest{
		Resources: &orchestratorv1.Resources{MemoryMib: -1}}, grpc.Trailer(&trailer))
	if err == nil {
		return nil, errors.New("CreateContainer with memory_mib -1 succeeded")
	}
	const field = "resources.memory_mib"
	saw := statusFields(err, trailer)
	if err := expectError(saw, "INVALID_ARGUMENT", "INVALID_FIELD", map[string]string{"field": field}); err != nil {
		return saw, err
	}
	if v, _ := saw["bad_request"].([]fields); len(v) != 1 || v[0]["field"] != field {
		return saw, fmt.Errorf("want a google.rpc.BadRequest with one violation of %q", field)
	}
	return saw, nil
}

func (w *walk) delete(ctx context.Context) (fields, error) {
	resp, err := w.containers.DeleteContainer(ctx, &orchestratorv1.DeleteContainerRequest{ContainerId: w.containerID})
	if err != nil {
		return nil, err
	}
	c := resp.GetContainer()
	saw := fields{"container_id": c.GetContainerId(), "state": c.GetState().String()}
	if c.GetContainerId() != w.containerID || (c.GetState() != orchestratorv1.ContainerState_CONTAINER_STATE_TERMINATING &&
		c.GetState() != orchestratorv1.ContainerState_CONTAINER_STATE_TERMINATED) {
		return saw, errors.New("want the same container, TERMINATING or TERMINATED")
	}
	return saw, nil
}
