# bash completion for fuse-disk-export (and qemu-fuse-disk-export.py, the same tool).
# Install: copy to /usr/share/bash-completion/completions/fuse-disk-export (and link it as
# qemu-fuse-disk-export.py there), or `source` this file from ~/.bashrc.
# tests/unit/test_completion.py keeps the option names and choices here in step with --help.

_fuse_disk_export_images() {
    # Disk images by their usual names, and directories to walk into; every file if none match.
    local cur=$1 f lower
    local -a found=() any=()
    while IFS= read -r f; do
        lower=${f,,}
        if [[ -d $f ]]; then
            found+=("$f")
        elif [[ $lower == *.@(qcow2|qcow|img|raw|vmdk|vdi|vhdx|vhd|vpc|qed|hdd|parallels|dmg|bochs|cloop|luks|iso|bin) ]]; then
            found+=("$f") any+=("$f")
        fi
    done < <(compgen -f -- "$cur")
    if ((${#any[@]} == 0)); then
        mapfile -t found < <(compgen -f -- "$cur")
    fi
    COMPREPLY+=("${found[@]}")
}

_fuse_disk_export() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    local opts="-h --help -d --daemonize -p --pid-file -r --read-only -f --format --backing
        --allow-other -m --mountpoint --mountpoint-dir -P --partition --list-partitions
        --mount-fs --fs-type --nbd-socket -s --snapshot --overlay -l --load-snapshot --passphrase-file
        --discard --detect-zeroes
        --cache --aio --iothreads --no-write-guard --log-file --list --doctor --json --stop -q --quiet -v --verbose
        --version"
    COMPREPLY=()
    compopt -o filenames 2>/dev/null

    case $prev in
        --backing) mapfile -t COMPREPLY < <(compgen -W "safe none any" -- "$cur"); return ;;
        --allow-other) mapfile -t COMPREPLY < <(compgen -W "auto on off" -- "$cur"); return ;;
        --discard) mapfile -t COMPREPLY < <(compgen -W "ignore unmap" -- "$cur"); return ;;
        --detect-zeroes) mapfile -t COMPREPLY < <(compgen -W "off on unmap" -- "$cur"); return ;;
        --cache)
            mapfile -t COMPREPLY < <(compgen -W "none writeback writethrough directsync unsafe" -- "$cur")
            return ;;
        --aio) mapfile -t COMPREPLY < <(compgen -W "threads native io_uring" -- "$cur"); return ;;
        -f | --format)
            mapfile -t COMPREPLY < <(compgen -W "raw qcow2 qcow vmdk vdi vhdx vpc qed parallels
                luks dmg bochs cloop" -- "$cur")
            return ;;
        -p | --pid-file | --log-file | -m | --mountpoint | --passphrase-file | --nbd-socket | --overlay)
            mapfile -t COMPREPLY < <(compgen -f -- "$cur"); return ;;
        --mountpoint-dir | --mount-fs) mapfile -t COMPREPLY < <(compgen -d -- "$cur"); return ;;
        --fs-type)
            mapfile -t COMPREPLY < <(compgen -W "ext2 ext3 ext4 ntfs vfat iso9660 squashfs" -- "$cur")
            return ;;
        -P | --partition | -l | --load-snapshot | --iothreads) return ;;
    esac

    if [[ $cur == -* ]]; then
        compopt +o filenames 2>/dev/null
        # shellcheck disable=SC2086 # word splitting of the option list is the point
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
        return
    fi
    local word
    for word in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
        if [[ $word == --stop ]]; then
            # What --stop takes: the mount points and pids of live exports, from --list --json.
            local item
            while IFS= read -r item; do
                [[ $item == "$cur"* ]] && COMPREPLY+=("$item")
            done < <("${COMP_WORDS[0]}" --list --json 2>/dev/null |
                sed -n -e 's/^ *"mountpoint": "\(.*\)",\{0,1\}$/\1/p' \
                    -e 's/^ *"pid": \([0-9]*\),\{0,1\}$/\1/p' | sort -u)
            return
        fi
    done
    _fuse_disk_export_images "$cur"
}

complete -F _fuse_disk_export fuse-disk-export qemu-fuse-disk-export.py
