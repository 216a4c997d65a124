#!/usr/bin/env bash
# Builds plots/offline.html, the page template of `dvc plots show` (.dvc/config: plots.html_template). It is DVC's
# own page with vega, vega-lite and vega-embed inlined, at the versions DVC's page loads from a CDN: the plots render
# with no network. The three packages come from the npm registry (`npm pack`), each checked against the sha512 below
# before it is used. Licences: plots/LICENSES.md. Needs npm and python3; run it only to change a version.
set -euo pipefail
cd "$(dirname "$0")"
PACKAGES=(
  "vega@5.20.2 build/vega.min.js sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="
  "vega-lite@5.2.0 build/vega-lite.min.js sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="
  "vega-embed@6.18.2 build/vega-embed.min.js sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="
)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts=()
for entry in "${PACKAGES[@]}"; do
  read -r spec file integrity <<<"$entry"
  tarball=$(cd "$tmp" && npm pack --silent "$spec")
  got="sha512-$(openssl dgst -sha512 -binary "$tmp/$tarball" | base64 -w0)"
  [[ "$got" == "$integrity" ]] || { echo "error: $spec is not the package this script pins ($got)" >&2; exit 1; }
  mkdir -p "$tmp/${spec%@*}" && tar xzf "$tmp/$tarball" -C "$tmp/${spec%@*}"
  scripts+=("$tmp/${spec%@*}/package/$file")
done
python3 - "${scripts[@]}" <<'PY'
import sys
from pathlib import Path

parts = []
for path in sys.argv[1:]:
    code = Path(path).read_text(encoding="utf-8")
    # DVC fills {plot_divs} (and {refresh_tag}) in the template; a script must not end the <script> element early.
    assert "{plot_divs}" not in code and "{refresh_tag}" not in code and "</script" not in code.lower(), path
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    parts.append(f"<script>\n{code}\n</script>")
page = f"""<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega 5.20.2, vega-lite 5.2.0, vega-embed 6.18.2 inlined by plots/build.sh (BSD-3-Clause, plots/LICENSES.md):
         this page loads nothing from the network. No scripts placeholder: DVC's CDN tags are left out. -->
    {chr(10).join(parts)}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""
Path("offline.html").write_text(page, encoding="utf-8")
PY
echo "wrote plots/offline.html ($(wc -c < offline.html) bytes)"
