/**
 * What `npm start` (scripts/setup.ts) must do about the Debian packages the default guest
 * needs, decided from facts alone so that each case has a unit test.
 */

/** How the packages get installed: not at all, by us (as root or with sudo), or by the user. */
export type PackagePlan =
  | { kind: "none" }
  | { kind: "install"; argv: string[] }
  | { kind: "ask"; command: string; why: string };

export interface PackageHost {
  /** We run as root. */
  root: boolean;
  /** `sudo -n true` works: sudo without a password. */
  sudo: boolean;
  /** apt-get and dpkg exist (Debian or a derivative). */
  apt: boolean;
}

/** The plan for `missing` packages on `host`. */
export function packagePlan(missing: readonly string[], host: PackageHost): PackagePlan {
  if (missing.length === 0) return { kind: "none" };
  const install = ["apt-get", "install", "-y", "--no-install-recommends", ...missing];
  if (!host.apt) {
    return { kind: "ask", command: `${install.join(" ")}`, why: "this is not a Debian-like system (no apt-get): install these packages, or their equivalents, yourself" };
  }
  if (host.root) return { kind: "install", argv: install };
  if (host.sudo) return { kind: "install", argv: ["sudo", "-n", ...install] };
  return { kind: "ask", command: `sudo ${install.join(" ")}`, why: "installing packages needs root, and sudo asks for a password" };
}

/** Which of `wanted` dpkg does not list as installed (`dpkg-query -W -f '${Package} ${db:Status-Status}\n'` output). */
export function missingPackages(wanted: readonly string[], dpkgOutput: string): string[] {
  const installed = new Set<string>();
  for (const line of dpkgOutput.split("\n")) {
    const [name, status] = line.trim().split(/\s+/);
    if (name !== undefined && status === "installed") installed.add(name.replace(/:.*$/, ""));
  }
  return wanted.filter((p) => !installed.has(p));
}

/** "5 s", "2 min 10 s". */
export function formatSeconds(s: number): string {
  const whole = Math.round(s);
  return whole < 60 ? `${whole} s` : `${Math.floor(whole / 60)} min ${whole % 60} s`;
}
