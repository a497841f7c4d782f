"""Protocol 4 with another CONTROL_SAMPLES (control samples per sample under each perturbation)."""
import sys
ratio = int(sys.argv.pop(1))
sys.path.insert(0, "experiments")
import virtualcell.simulator as S
S.CONTROL_SAMPLES = ratio
import protocol_4_screen_ranking as p4
p4.main(sys.argv[1:])
