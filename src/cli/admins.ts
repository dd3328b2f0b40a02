import { adminEmailSchema, adminView, createAdmin, disableAdmin, listAdmins, passwordSchema, type AdminRow } from '../accounts/admins.ts';
import { generatePassword } from '../lib/passwords.ts';
import {
  iso,
  output,
  parse,
  readStdin,
  refuseOnCommandLine,
  required,
  requireWorkspace,
  UsageError,
  withDeps,
  type Cli,
  type Command,
} from './shared.ts';

/** Where the password comes from, in order: stdin (when asked), DSR_ADMIN_PASSWORD, or a generated one. */
async function passwordFor(cli: Cli, fromStdin: boolean): Promise<{ password: string; generated: boolean; source: string }> {
  if (fromStdin) {
    // One trailing line ending is the shell's (echo, a here-string), not part of the password.
    const password = (await readStdin(cli.stdin)).replace(/\r?\n$/, '');
    return { password, generated: false, source: 'the password read from stdin' };
  }
  const fromEnv = cli.processEnv.DSR_ADMIN_PASSWORD;
  if (fromEnv) return { password: fromEnv, generated: false, source: 'DSR_ADMIN_PASSWORD' };
  return { password: generatePassword(), generated: true, source: 'the generated password' };
}

const adminLine = (a: AdminRow) =>
  `${a.id}  ${a.email}  created ${iso(a.createdAt)}  password changed ${iso(a.passwordChangedAt)}` +
  (a.disabledAt ? `  DISABLED ${iso(a.disabledAt)}` : '');

const create: Command = async (cli, args) => {
  refuseOnCommandLine(args, ['password'], 'pipe it with --password-stdin, or set DSR_ADMIN_PASSWORD');
  const { values } = parse('admins create', args, {
    workspace: { type: 'string' },
    email: { type: 'string' },
    'password-stdin': { type: 'boolean' },
  });
  const workspaceId = required('admins create', 'workspace', values.workspace, 'id');
  const email = adminEmailSchema.safeParse(required('admins create', 'email', values.email));
  if (!email.success) throw new UsageError('--email must be a valid email address');
  const pw = await passwordFor(cli, values['password-stdin'] === true);
  const checked = passwordSchema.safeParse(pw.password);
  if (!checked.success) throw new UsageError(`${pw.source} must have ${checked.error.issues[0]!.message}`);

  const row = await withDeps(cli, async (deps) =>
    createAdmin(deps.db, { workspaceId: await requireWorkspace(deps.db, workspaceId), email: email.data, password: pw.password }),
  );
  const view = adminView(row);
  output(cli, pw.generated ? { ...view, generatedPassword: pw.password } : view, () => [
    `Admin ${row.id} (${row.email}) created in ${row.workspaceId}.`,
    ...(pw.generated ? ['Generated password, shown once (change it after the first login):', `  ${pw.password}`] : []),
  ]);
  return 0;
};

const list: Command = async (cli, args) => {
  const { values } = parse('admins list', args, { workspace: { type: 'string' } });
  const workspaceId = required('admins list', 'workspace', values.workspace, 'id');
  const rows = await withDeps(cli, async (deps) => listAdmins(deps.db, await requireWorkspace(deps.db, workspaceId)));
  output(cli, { data: rows.map(adminView) }, () => (rows.length ? rows.map(adminLine) : 'no admins'));
  return 0;
};

/** Disables an admin and ends their sessions, as POST /v1/admin/admins/:id/disable does (e.g. a lost laptop). */
const disable: Command = async (cli, args) => {
  const { values, ids } = parse('admins disable', args, { workspace: { type: 'string' } }, ['adminId']);
  const workspaceId = required('admins disable', 'workspace', values.workspace, 'id');
  const row = await withDeps(cli, async (deps) => disableAdmin(deps.db, await requireWorkspace(deps.db, workspaceId), ids[0]!));
  output(cli, adminView(row), () => `Admin ${row.id} disabled: their sessions are ended and they can no longer log in.`);
  return 0;
};

export const adminCommands: Record<string, Command> = { create, list, disable };
