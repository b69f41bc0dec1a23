"""No file of the repository names a code-hosting repository URL.

Whoever owns a repository that a notebook clones, a doc tells users to install, or a config
downloads from decides what runs on our users' machines; an account we do not own is someone
else's code. mmjax owns no repository URL, so the allowlist is empty: the notebooks take the
package source from the user (the install cell's MMJAX_SOURCE form field), and the docs say "your
clone". Once the project owns a home, its URL goes in one place, pyproject.toml's `[project.urls]`
`Repository` line, and that line alone joins ALLOWED (tools read it from the package metadata).

The files are the repository's (`git ls-files`, tracked and new, not ignored), notebooks' saved
outputs included; a URL is one on a code host below (with a path after the host), or any host's
clone URL (`.git`, `git@host:`).
"""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Code hosts (their web sites, such as github.io pages, host no repository).
HOSTS = ("github.com", "githubusercontent.com", "gitlab.com", "bitbucket.org", "codeberg.org",
         "gitee.com", "gitea.com", "sr.ht", "sourceforge.net", "launchpad.net", "pagure.io",
         "huggingface.co", "hf.co", "colab.research.google.com/github")
URL = re.compile(
    r"(?<![\w.-])(?:[\w-]+\.)*(?:" + "|".join(map(re.escape, HOSTS)) + r")[/:][^\s\"'<>)\]]*"
    r"|(?:git\+)?(?:https?|ssh|git)://(?:[\w.-]+@)?[\w-]+(?:\.[\w-]+)+(?::\d+)?/[^\s\"'<>)\]]*?\.git\b"
    r"|git@[\w-]+(?:\.[\w-]+)+:[^\s\"'<>)\]]*", re.IGNORECASE)
# (path, the whole line, stripped) pairs allowed to name a URL: none (see above).
ALLOWED: set[tuple[str, str]] = set()


def repository_files() -> list[str]:
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True, check=True)
  return sorted({p for p in out.stdout.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))})


def foreign_urls(text: str, path: str) -> list[str]:
  """'path:line: url' for each repository URL of `text` outside ALLOWED."""
  return [f"{path}:{n}: {m.group(0)}" for n, line in enumerate(text.splitlines(), 1)
          for m in URL.finditer(line) if (path, line.strip()) not in ALLOWED]


def test_the_pattern_finds_repository_urls_and_nothing_else():
  # hosts as variables: this file's own text names no URL
  github, gitlab, raw, hub, other = "github.com", "gitlab.com", "raw.githubusercontent.com", "hf.co", "code.example.org"
  found = [f"https://{github}/owner/repo", f"git clone https://{gitlab}/a/b.git", f"see www.{github}/owner",
           f"pip install git+ssh://git@{other}/a/b.git", f"git@{github}:owner/repo.git",
           f"{raw}/a/b/main/x.py", f"https://{hub}/owner/model", f"https://{other}/a/b.git",
           f'"MMJAX_GIT = \\"https://{github}/x/y\\"\\n",']  # a line of a notebook's JSON
  for line in found:
    assert foreign_urls(line, "f"), line
  for line in ["a GitHub fork", "https://arxiv.org/abs/1706.01427", "https://HOST/OWNER/REPO.git",
               "git@host:path", f"my{github}munity/x", "https://example.org/path?q=1&x=2"]:
    assert not foreign_urls(line, "f"), line


def test_no_file_names_a_repository_url():
  files = repository_files()
  assert "tests/test_no_foreign_urls.py" in files and len(files) > 50, files[:10]
  hits = []
  for path in files:
    with open(os.path.join(ROOT, path), "rb") as f:
      data = f.read()
    if b"\0" not in data:  # text files only
      hits += foreign_urls(data.decode("utf-8", errors="replace"), path)
  assert not hits, ("repository URLs outside the allowlist (tests/test_no_foreign_urls.py explains "
                    "why none is allowed):\n  " + "\n  ".join(hits))
