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

// installCommand is `sandhub-agent install [--chown UID:GID] [--token-env
// VAR --token-file PATH] DEST [DIR...]`: the binary to DEST, and each DIR
// made and handed to UID:GID. An init container (root) prepares a shared
// volume that way for a main container running as another user (ECS bind
// mounts start root's, mode 0755). With --token-env, the init container's
// variable VAR (the agent's credential) is written to PATH (0600, UID:GID's),
// so the main container gets it as a file it removes after reading, never in
// its environment (which /proc/1/environ would show for good).
func installCommand(args []string) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	owner := fs.String("chown", "", "UID:GID that gets each DIR (and the token file)")
	tokenEnv := fs.String("token-env", "", "variable holding the agent's token, written to --token-file")
	tokenFile := fs.String("token-file", "", "where --token-env's value goes (mode 0600; its directory is made)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 1 {
		return errors.New("usage: sandhub-agent install [--chown UID:GID] [--token-env VAR --token-file PATH] DEST [DIR...]")
	}
	if (*tokenEnv == "") != (*tokenFile == "") {
		return errors.New("--token-env and --token-file go together")
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
	if *tokenEnv != "" {
		return writeToken(os.Getenv(*tokenEnv), *tokenEnv, *tokenFile, uid, gid)
	}
	return nil
}

// writeToken puts the token in path atomically (a temporary file, then
// rename), mode 0600, owned by uid:gid (-1: the caller).
func writeToken(tok, env, path string, uid, gid int) error {
	if len(tok) < 16 || len(tok) > 1024 {
		return fmt.Errorf("--token-env %s: the variable must hold the token (16-1024 characters)", env)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Lchown(dir, uid, gid); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".sandhub-token-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename: nothing left to remove
	if _, err := tmp.WriteString(tok); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chown(uid, gid); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
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
