# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

# The training command every launcher runs, before its own process flags.
# shellcheck disable=SC2034  # Used by the scripts that source this file.
MAIN=(-m vit_jax train)

# Prints an error and exits with status 2 (a usage mistake).
die() {
  echo "${0##*/}: $*" >&2
  exit 2
}

# One argument, quoted for a POSIX shell only when it needs it.
quote_arg() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# All arguments as one pasteable command line (no newline).
quote() {
  local sep="" arg
  for arg in "$@"; do
    printf '%s' "$sep"
    quote_arg "$arg"
    sep=" "
  done
}

# Checks that option $1 has a value $2 and prints it.
value() {
  [[ -n ${2-} && $2 != --* ]] || die "$1 needs a value (see --help)"
  printf '%s' "$2"
}

# Checks that $2 (the value of option $1) is a positive integer.
positive() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}
