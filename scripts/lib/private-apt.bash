# Sourced by scripts/qemu-fetch and scripts/samples-fetch: apt on a private folder, nothing
# system-wide touched.  `private_apt DIR TYPE SUITE` writes DIR's sources for SUITE of the
# machine's own mirror (TYPE deb or deb-src; SUITE may be several), sets the array apt_opts that points apt-get and
# apt-cache at DIR, and runs apt-get update there.  The caller defines say and die.

# The mirror: URIs of the system's entry for $codename (deb822 .sources first, then one-line lists).
read_sources() {  # uses $codename
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk -v want="$codename" -v file="$f" 'BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; key = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^#/ || $i !~ /^[A-Za-z-]+:/) continue
          name = tolower(substr($i, 1, index($i, ":") - 1))
          value = substr($i, index($i, ":") + 1); gsub(/^[ \t]+|[ \t]+$/, "", value)
          if (name == "types") types = value
          else if (name == "uris") uris = value
          else if (name == "suites") suites = value
          else if (name == "signed-by") key = value
          else if (name == "enabled") enabled = tolower(value)
        }
        if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " want " ")) {
          split(uris, u, " "); print u[1] "|" key "|" file; exit
        }
      }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    awk -v want="$codename" -v file="$f" '
      $1 == "deb" {
        key = ""
        if ($2 ~ /^\[/) {  # [option=value ...]
          opts = $0; sub(/^deb[ \t]+\[/, "", opts); sub(/\].*/, "", opts)
          n = split(opts, o, /[ \t]+/)
          for (i = 1; i <= n; i++) if (o[i] ~ /^signed-by=/) key = substr(o[i], 11)
          line = $0; sub(/^deb[ \t]+\[[^]]*\][ \t]*/, "", line); split(line, w, /[ \t]+/)
        } else { w[1] = $2; w[2] = $3 }
        if (w[2] == want) { print w[1] "|" key "|" file; exit }
      }' "$f"
  done
}

# private_apt DIR TYPE SUITE...
private_apt() {
  local dir=$1 type=$2 uri key from out
  shift 2
  local suite="$*"
  command -v apt-get >/dev/null || die "apt-get is needed (a Debian machine)"
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [[ -n $codename ]] || die "no VERSION_CODENAME in /etc/os-release"
  IFS='|' read -r uri key from < <(read_sources | head -n 1) || true
  [[ -n ${uri:-} ]] \
    || die "no apt source for '$codename' in /etc/apt/sources.list{,.d/}: cannot tell the mirror"
  uri=${uri%/}
  say "mirror $uri (from $from); $type $suite"
  mkdir -p "$dir/sources.list.d" "$dir/preferences.d" "$dir/lists/partial" \
    "$dir/cache/archives/partial"
  rm -f "$dir/sources.list.d/"*.sources
  {
    echo "Types: $type"
    echo "URIs: $uri"
    echo "Suites: $suite"
    echo "Components: main"
    # A key file the system's entry names; an inline key or none: apt's usual keyrings.
    if [[ ${key:-} == /* && -r ${key:-} ]]; then echo "Signed-By: $key"; fi
  } >"$dir/sources.list.d/private.sources"
  apt_opts=(
    -o "Dir::Etc::sourcelist=/dev/null"
    -o "Dir::Etc::sourceparts=$dir/sources.list.d"
    -o "Dir::Etc::preferences=/dev/null"
    -o "Dir::Etc::preferencesparts=$dir/preferences.d"
    -o "Dir::State::lists=$dir/lists"
    -o "Dir::Cache=$dir/cache"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"  # the private folders are root's; no switch to _apt
  )
  say "apt-get update (private lists in ${dir#"$PWD/"}/lists)"
  if ! out=$(apt-get "${apt_opts[@]}" -q update 2>&1) \
    || grep -qE '^(E:|W: Failed to fetch|W: Some index files failed)' <<<"$out"; then
    echo "$out" >&2
    die "apt-get update of $uri $suite failed"
  fi
}
