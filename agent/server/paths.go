package server

import (
	"path/filepath"
	"strings"
)

const maxPathBytes = 4096

// refusedRoots are the kernel's filesystems: never written or read as files.
var refusedRoots = []string{"/proc", "/sys", "/dev"}

// resolvePath applies the contract's path rules and makes p absolute
// against base. The rules are lexical on purpose: the agent runs as the
// container's user inside it, so a symlink can only lead to what that user
// could reach with a command anyway.
func resolvePath(p, base string) (string, error) {
	if p == "" {
		return "", pathNotAllowed(p, "the path is empty")
	}
	if len(p) > maxPathBytes {
		return "", pathNotAllowed(p[:64]+"...", "the path is longer than 4096 bytes")
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", pathNotAllowed(p, "the path contains a NUL character")
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return "", pathNotAllowed(p, "the path contains \"..\"")
		}
	}
	abs := p
	if !filepath.IsAbs(abs) {
		abs = filepath.Join(base, abs)
	}
	abs = filepath.Clean(abs)
	if len(abs) > maxPathBytes {
		return "", pathNotAllowed(p, "the path is longer than 4096 bytes")
	}
	for _, root := range refusedRoots {
		if abs == root || strings.HasPrefix(abs, root+"/") {
			return "", pathNotAllowed(p, "paths under /proc, /sys and /dev are refused")
		}
	}
	return abs, nil
}
