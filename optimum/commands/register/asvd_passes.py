"""Registers ``optimum-cli asvd compress`` (optimum's command-plugin namespace; keep imports lazy)."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class ASVDCompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="compress", help="ASVD-compress a causal LM (same as `asvd compress`)")

    @staticmethod
    def parse_args(parser):
        from asvd_passes.cli import add_compress_arguments

        add_compress_arguments(parser)

    def run(self):
        import sys

        from asvd_passes.cli import run_compress, run_reporting_errors

        status = run_reporting_errors(run_compress, self.args)
        if status:
            sys.exit(status)  # optimum-cli ignores run()'s return value


class ASVDCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="asvd", help="asvd-passes: activation-aware SVD compression")
    SUBCOMMANDS = (CommandInfo(name="compress", help=ASVDCompressCommand.COMMAND.help, subcommand_class=ASVDCompressCommand),)


REGISTER_COMMANDS = [ASVDCommand]  # no parent: `optimum-cli asvd ...`
