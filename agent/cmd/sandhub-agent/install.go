package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// installCommand is `sandhub-agent install [--chown UID:GID] DEST [DIR...]`:
// the binary to DEST, and each DIR made and handed to UID:GID. An init
// container (root) prepares a shared volume that way for a main container
// running as another user (ECS bind mounts start root's, mode 0755).
func installCommand(args []string) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	owner := fs.String("chown", "", "UID:GID that gets each DIR")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 1 {
		return errors.New("usage: sandhub-agent install [--chown UID:GID] DEST [DIR...]")
	}
	if err := install(fs.Arg(0)); err != nil {
		return err
	}
	if fs.NArg() > 1 && *owner == "" {
		return errors.New("directories given without --chown UID:GID")
	}
	uid, gid, err := parseOwner(*owner)
	if err != nil {
		return err
	}
	for _, dir := range fs.Args()[1:] {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := os.Lchown(dir, uid, gid); err != nil {
			return err
		}
	}
	return nil
}

func parseOwner(s string) (int, int, error) {
	if s == "" {
		return -1, -1, nil
	}
	u, g, ok := strings.Cut(s, ":")
	uid, err1 := strconv.ParseUint(u, 10, 31)
	gid, err2 := strconv.ParseUint(g, 10, 31)
	if !ok || err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("--chown %q: want UID:GID (numbers)", s)
	}
	return int(uid), int(gid), nil
}

// install copies the running executable to dest (mode 0555), atomically: a
// temporary file in dest's directory, synced, then renamed over dest. It is
// how an init container of an image with no cp delivers the agent into a
// shared volume (`/sandhub-agent install /sandhub/sandhub-agent`).
func install(dest string) error {
	self, err := os.Open("/proc/self/exe")
	if err != nil {
		return fmt.Errorf("opening its own executable: %w", err)
	}
	defer self.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dest), ".sandhub-agent-install-*")
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if _, err := io.Copy(tmp, self); err != nil {
		return fmt.Errorf("copying to %s: %w", dest, err)
	}
	if err := tmp.Chmod(0o555); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dest); err != nil {
		return err
	}
	done = true
	return nil
}
